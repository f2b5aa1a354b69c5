"""Per-host shares: one calling address (or calling AE title) that opens associations and keeps
them holds at most its share of the slots, and of the pending connections; another host is served."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_io import events
from dicom_io.admission import share_limit
from tests.helpers.listener import Listener
from tests.helpers.processes import listening

pytestmark = pytest.mark.slow  # a listener on a port; `pneumoscreen listen`

LOCAL_LIMIT = (0x02, 0x03, 0x02)


def _associate(port: int, *, source: str, ae_title: str = "HOARDER"):
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN", bind_address=(source, 0))


def _rejection(assoc) -> tuple[int, int, int] | None:
    if not assoc.is_rejected:
        return None
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def _echo_served(port: int, *, source: str, ae_title: str) -> bool:
    assoc = _associate(port, source=source, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_share_limit_is_half_the_slots_and_at_least_one():
    assert share_limit(0.5, 16) == 8
    assert share_limit(0.5, 1) == 1
    assert share_limit(0.25, 10) == 2
    assert share_limit(1.0, 16) == 16


def test_a_host_holding_its_share_is_refused_local_limit_while_another_is_served(tmp_path, database_url):
    refused: list[events.AssociationRefused] = []
    events.subscribe(refused.append)
    listener = Listener(tmp_path, database_url, max_associations=4, allowed_aes={"HOARDER", "OTHER"})
    held = []
    try:
        held = [_associate(listener.port, source="127.0.0.1") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = _associate(listener.port, source="127.0.0.1", ae_title="OTHER")
        assert _rejection(third) == LOCAL_LIMIT  # the address holds its share, whatever its AE title
        # the same AE title from another address is over the title's share; another title is served
        assert _rejection(_associate(listener.port, source="127.0.0.2")) == LOCAL_LIMIT
        assert _echo_served(listener.port, source="127.0.0.2", ae_title="OTHER")
        # the hoarder lets one go: it may take one again
        held.pop().release()
        time.sleep(0.3)
        again = _associate(listener.port, source="127.0.0.1")
        assert again.is_established
        held.append(again)
    finally:
        for assoc in held:
            assoc.release()
        listener.close()
        events.unsubscribe(refused.append)
    reasons = [(r.peer.address, r.peer.ae_title, r.reason) for r in refused]
    assert len(reasons) == 2, reasons
    assert reasons[0][:2] == ("127.0.0.1", "OTHER") and "127.0.0.1 already holds 2" in reasons[0][2]
    assert reasons[1][:2] == ("127.0.0.2", "HOARDER") and "calling AE HOARDER already holds 2" in reasons[1][2]


def test_pneumoscreen_listen_serves_a_second_host_while_the_first_hoards(tmp_path):
    """Bound to 0.0.0.0 with an allow list, the defaults (16 slots, 64 pending connections, half each):
    127.0.0.1 holds 20 associations and 40 idle connections open; 127.0.0.2's C-ECHO is served."""
    with listening(tmp_path, "memory://", host="0.0.0.0", allowed_aes="HOARDER,OTHER") as (port, listener, _), \
            ExitStack() as stack:
        held = []
        for _ in range(20):
            assoc = _associate(port, source="127.0.0.1")
            if assoc.is_established:
                stack.callback(assoc.release)
                held.append(assoc)
            else:
                assert _rejection(assoc) == LOCAL_LIMIT
        assert len(held) == 8
        for _ in range(40):  # connections that never send an A-ASSOCIATE-RQ
            idle = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.1", 0))
            stack.callback(idle.close)
        assert _echo_served(port, source="127.0.0.2", ae_title="OTHER")
        log = listener.log()
    assert "already holds 8 of 16 association slots" in log
    assert "already holds 32 of the 64 pending connections" in log
