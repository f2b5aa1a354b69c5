"""The bounds on what a DICOM peer sends, in process and with raw PDU bytes (as pynetdicom's own
test_dul.py does): an association of ours on one end of a socket pair, the test's bytes on the
other; nothing listens on a port. Also: the refusal log, the scope of the bounds (our AEs only)
and the check of the pynetdicom internals they rely on."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator

import pynetdicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicom_io import wire
from dicom_io.admission import ListenerAE
from dicom_io.wire import (
    COMMAND_SET_BYTES,
    BoundedAE,
    BoundedDIMSE,
    BoundedDUL,
    IncompatiblePynetdicomError,
    PeerBounds,
    PeerLog,
    bound,
    pynetdicom_problems,
)
from tests.helpers.network_fuzz import association_rq
from tests.helpers.processes import free_port

MAX_PDU = 16384
A_ABORT_INVALID_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


class Wire:
    """An acceptor association of a ``BoundedAE`` made as the listener's handler makes it (socket
    first, then the bounds), its socket one end of a pair; ``peer`` is the other end."""

    def __init__(self, state: str) -> None:
        ae = BoundedAE("PNEUMOSCREEN")
        ae.maximum_pdu_size, ae.acse_timeout, ae.network_timeout = MAX_PDU, 2, 2
        ours, self.peer = socket.socketpair()
        self.peer.settimeout(2)
        self.assoc = Association(ae, "acceptor")
        self.assoc.set_socket(AssociationSocket(self.assoc, client_socket=ours))
        bound(self.assoc)
        self.assoc.acceptor.maximum_length = MAX_PDU
        self.assoc.requestor.address_info = AddressInformation("192.0.2.7", 50104)
        self.dul = self.assoc.dul
        self.dul.state_machine.current_state = state
        assert self.events() == ["Evt5"]  # the connection's event, queued before the bounds, is kept

    def read(self, data: bytes) -> list[str]:
        """Send ``data`` from the peer, let the association read one PDU: the events it queued."""
        self.peer.sendall(data)
        self.dul._read_pdu_data()
        return self.events()

    def events(self) -> list[str]:
        found = []
        while not self.dul.event_queue.empty():
            found.append(self.dul.event_queue.get_nowait())
        return found

    def received(self) -> bytes:
        """What the peer got back until the association closed its end (closing with bytes of the
        peer's left unread resets the connection: a close too)."""
        data = b""
        try:
            while chunk := self.peer.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        return data

    def close(self) -> None:
        self.peer.close()
        if self.dul.socket.socket is not None:
            self.dul.socket.socket.close()


@pytest.fixture
def associated() -> Iterator[Wire]:
    """Established (Sta6): P-DATA is expected."""
    w = Wire("Sta6")
    yield w
    w.close()


@pytest.fixture
def awaiting_request() -> Iterator[Wire]:
    """A connection accepted, no A-ASSOCIATE-RQ yet (Sta2)."""
    w = Wire("Sta2")
    yield w
    w.close()


def _p_data_tf(*fragments: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header + fragment) items."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cx, data] for cx, data in fragments]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _echo_request() -> list[P_DATA]:
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 7, Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    return list(message.encode_msg(1, MAX_PDU))


def test_a_normal_association_request_is_decoded(awaiting_request):
    assert awaiting_request.read(association_rq(calling="MODALITY")) == ["Evt6"]
    pdu = awaiting_request.dul._recv_pdu.get_nowait()
    assert isinstance(pdu, A_ASSOCIATE_RQ) and pdu.calling_ae_title == "MODALITY"


def test_a_normal_c_echo_command_set_arrives_as_its_message(associated):
    [fragment] = _echo_request()
    pdu_bytes = _p_data_tf(*fragment.presentation_data_value_list)
    assert associated.read(pdu_bytes) == ["Evt10"]
    pdu = associated.dul._recv_pdu.get_nowait()
    associated.assoc.dimse.receive_primitive(pdu.to_primitive())
    context_id, message = associated.assoc.dimse.msg_queue.get_nowait()
    assert context_id == 1 and isinstance(message, C_ECHO)
    assert message.MessageID == 7 and message.AffectedSOPClassUID == Verification


def test_a_p_data_pdu_at_the_announced_maximum_is_read(associated):
    item = b"\x00" + bytes(MAX_PDU - 4 - 1 - 1)  # item length (4), context ID (1), control header (1), data
    pdu_bytes = _p_data_tf((1, item))
    assert len(pdu_bytes) == 6 + MAX_PDU
    assert associated.read(pdu_bytes) == ["Evt10"]


def test_a_p_data_pdu_one_byte_over_the_maximum_is_aborted_before_it_is_read(associated):
    header = struct.pack(">BBL", 0x04, 0, MAX_PDU + 1)
    assert associated.read(header) == ["Evt17"]
    assert associated.received() == A_ABORT_INVALID_PARAMETER
    assert associated.dul._recv_pdu.empty()


def test_an_association_request_claiming_4_gb_is_closed_without_reading_it(awaiting_request):
    started = time.monotonic()
    assert awaiting_request.read(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF)) == ["Evt17"]
    assert time.monotonic() - started < 1.0
    assert awaiting_request.received() == b""  # before an association: no A-ABORT, only the close


def test_a_pdu_cut_off_midway_is_aborted(associated, caplog):
    associated.peer.sendall(struct.pack(">BBL", 0x04, 0, 100) + bytes(50))
    associated.peer.shutdown(socket.SHUT_WR)
    with caplog.at_level(logging.WARNING, logger="dicom_io.wire"):
        associated.dul._read_pdu_data()
    assert associated.events() == ["Evt17"]
    assert associated.received() == A_ABORT_INVALID_PARAMETER
    assert "P-DATA-TF cut off or too slow: 50 of 100 bytes" in caplog.text


def test_a_pdu_header_cut_off_closes_the_connection(awaiting_request):
    awaiting_request.peer.sendall(b"\x01\x00\x00")
    awaiting_request.peer.shutdown(socket.SHUT_WR)
    awaiting_request.dul._read_pdu_data()
    assert awaiting_request.events() == ["Evt17"]
    assert awaiting_request.dul._recv_pdu.empty()


def test_an_unknown_pdu_type_is_aborted(associated):
    assert associated.read(struct.pack(">BBL", 0x47, 0, 4)) == ["Evt17"]
    assert associated.received() == struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x01)


def test_p_data_before_an_association_is_closed(awaiting_request):
    assert awaiting_request.read(_p_data_tf((1, b"\x03" + bytes(10)))) == ["Evt17"]
    assert awaiting_request.received() == b""


def test_a_dimse_command_set_growing_past_its_bound_is_aborted(associated):
    """A hostile peer sends command fragments that never say "last": each is within the PDU size,
    together they cross COMMAND_SET_BYTES."""
    fragment = b"\x01" + bytes(MAX_PDU - 100)  # command, more fragments follow
    dimse = associated.assoc.dimse
    assert isinstance(dimse, BoundedDIMSE)
    sent = 0
    while sent + len(fragment) - 1 <= COMMAND_SET_BYTES:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[1, fragment]]
        dimse.receive_primitive(primitive)
        sent += len(fragment) - 1
    assert associated.events() == []
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, fragment]]
    dimse.receive_primitive(primitive)
    assert associated.events() == ["Evt17"]
    assert associated.received() == A_ABORT_INVALID_PARAMETER
    assert dimse.msg_queue.empty()
    assert dimse.message.encoded_command_set.tell() == sent  # the fragment over the bound was not kept


def test_a_data_set_kept_in_memory_is_bounded(associated, monkeypatch):
    monkeypatch.setattr(wire, "IN_MEMORY_DATASET_BYTES", 1000)
    dimse = associated.assoc.dimse
    for data in (b"\x00" + bytes(600), b"\x00" + bytes(600)):
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[1, data]]
        dimse.receive_primitive(primitive)
    assert associated.events() == ["Evt17"]
    assert associated.received() == A_ABORT_INVALID_PARAMETER


def test_plain_pynetdicom_objects_are_left_as_they_are():
    assert DULServiceProvider._read_pdu_data.__module__ == "pynetdicom.dul"
    assert DIMSEMessage.decode_msg.__module__ == "pynetdicom.dimse_messages"
    plain = Association(AE(), "requestor")
    assert type(plain.dul) is DULServiceProvider and type(plain.dimse) is DIMSEServiceProvider
    ours = bound(Association(BoundedAE(), "requestor"))
    assert isinstance(ours.dul, BoundedDUL) and isinstance(ours.dimse, BoundedDIMSE)
    assert ours.dul.artim_timer.timeout == ours.acse_timeout  # the timeouts follow onto the new provider


def test_the_installed_pynetdicom_has_what_the_bounds_rely_on():
    assert pynetdicom_problems() == []
    assert wire.PYNETDICOM_PROBLEMS == ()


def test_a_renamed_or_reshaped_private_method_is_found(monkeypatch):
    monkeypatch.delattr(DULServiceProvider, "_read_pdu_data")
    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", lambda self: None)
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    problems = pynetdicom_problems()
    assert "DULServiceProvider._read_pdu_data is gone" in problems
    assert "DIMSEServiceProvider.receive_primitive takes (self), not (self, primitive)" in problems
    assert "version 3.1.0 is not 3.0.x" in problems


def test_the_listener_refuses_to_be_made_when_pynetdicom_lacks_them(monkeypatch):
    monkeypatch.setattr(wire, "PYNETDICOM_PROBLEMS", ("DULServiceProvider._read_pdu_data is gone",))
    with pytest.raises(IncompatiblePynetdicomError, match=r"_read_pdu_data is gone.*pinned in pyproject.toml"):
        ListenerAE("PNEUMOSCREEN", peer_bounds=PeerBounds(), artim_timeout=5, max_pending_connections=8)
    with pytest.raises(IncompatiblePynetdicomError):
        BoundedAE("SCU")


@pytest.mark.slow  # two in-process servers on free ports
def test_over_the_network_only_our_aes_associations_are_bounded():
    seen: dict[str, type] = {}

    def echo(name):
        def handle(event):
            seen[name] = type(event.assoc.dul)
            return 0x0000
        return handle

    ours, plain = BoundedAE("OURS"), AE("PLAIN")
    servers = []
    for ae, name in ((ours, "our acceptor"), (plain, "plain acceptor")):
        ae.add_supported_context(Verification)
        ae.add_requested_context(Verification)
        port = free_port()
        servers.append((port, ae.start_server(("127.0.0.1", port), block=False,
                                              evt_handlers=[(evt.EVT_C_ECHO, echo(name))])))
    try:
        for requestor, (port, _), name in ((plain, servers[0], "plain requestor"),
                                           (ours, servers[1], "our requestor")):
            assoc = requestor.associate("127.0.0.1", port)
            assert assoc.is_established
            seen[name] = type(assoc.dul)
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    finally:
        for _, server in servers:
            server.shutdown()
    assert seen == {"our acceptor": BoundedDUL, "plain requestor": DULServiceProvider,
                    "plain acceptor": DULServiceProvider, "our requestor": BoundedDUL}


def test_refused_peers_are_logged_at_most_a_burst_per_window(caplog):
    logger = logging.getLogger("test.peerlog")
    peer_log = PeerLog(logger, burst=5, window=0.5)
    with caplog.at_level(logging.WARNING, logger="test.peerlog"):
        for n in range(50):
            peer_log.refused(f"10.0.0.{n}:104", "unknown PDU type 0x47")
        assert len(caplog.records) == 5
        time.sleep(0.6)
        peer_log.refused("10.0.0.99:104", "unknown PDU type 0x47")
    assert len(caplog.records) == 6
    assert "45 more refused peers not logged" in caplog.records[-1].getMessage()

