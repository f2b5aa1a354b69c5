"""Hostile and broken peers against a running listener, over real sockets.

A `pneumoscreen listen` process (SQLite, the tests' Redis db, ARTIM 2 s, C-STORE data sets up
to 1 MB) meets what a vulnerability scanner or a broken modality sends: PDU lengths of 4 GB,
random bytes, P-DATA before an association, a PDU one byte over the maximum, idle and slow
connections by the hundred, a data set over the limit or cut off midway. During each, dcmtk's
echoscu and a storescu of a real film succeed within a few seconds; after each, the listener's
memory is back near where it started, no partly received file is left, and every film stored
is recorded.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from sqlalchemy import create_engine, select

from db.models import Instance
from tests.helpers.dicom_factory import chest_dataset, write_chest_dicom
from tests.helpers.network_fuzz import association_rq
from tests.helpers.processes import REDIS_URL, Process, flushed_redis, listening, wait_until

pytestmark = pytest.mark.slow

ECHOSCU = "/usr/bin/echoscu"  # dcmtk's, not pynetdicom's console script of the same name
STORESCU = "/usr/bin/storescu"
ARTIM = 2.0
MAX_PDU = 262144
RSS_MARGIN = 80 << 20
A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04


class Target:
    """The listener under attack, and what a well-behaved peer expects of it."""

    def __init__(self, port: int, listener: Process, data_dir: Path) -> None:
        self.port = port
        self.listener = listener
        self.data_dir = data_dir
        self.stored: list[str] = []
        self.baseline_rss = 0

    def rss(self) -> int:
        for line in Path(f"/proc/{self.listener.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def well_behaved(self) -> None:
        """dcmtk's echoscu, then storescu of a new film: both succeed within a few seconds."""
        env = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
        started = time.monotonic()
        echo = subprocess.run([ECHOSCU, "-to", "10", "-aec", "PNEUMOSCREEN", "127.0.0.1", str(self.port)],
                              capture_output=True, text=True, timeout=30, env=env)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        film = self.data_dir.parent / f"film-{len(self.stored)}.dcm"
        ds = write_chest_dicom(film, sop_class="CR")
        store = subprocess.run([STORESCU, "-to", "10", "-aec", "PNEUMOSCREEN", "127.0.0.1", str(self.port), str(film)],
                               capture_output=True, text=True, timeout=30, env=env)
        assert store.returncode == 0, store.stdout + store.stderr
        assert str(ds.SOPInstanceUID) in self.recorded(), "storescu's film is not recorded"
        self.stored.append(str(ds.SOPInstanceUID))
        assert time.monotonic() - started < 8, "a well-behaved peer waited too long"

    def recorded(self) -> set[str]:
        engine = create_engine(f"sqlite:///{self.data_dir / 'pneumoscreen.db'}")
        try:
            with engine.connect() as c:
                return set(c.scalars(select(Instance.SOPInstanceUID)))
        finally:
            engine.dispose()

    def leftovers(self) -> list[Path]:
        incoming = list((self.data_dir / "incoming").glob("*"))
        parts = list((self.data_dir / "spool").rglob(".incoming-*"))
        return incoming + parts

    def assert_healthy(self) -> None:
        assert self.listener.proc.poll() is None, self.listener.log()[-3000:]
        self.well_behaved()
        wait_until(lambda: not self.leftovers(), timeout=ARTIM + 5, what="no partly received file left")
        assert self.rss() < self.baseline_rss + RSS_MARGIN, (self.rss() >> 20, self.baseline_rss >> 20)
        assert set(self.stored) <= self.recorded(), "a film answered with success is not recorded"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with flushed_redis(REDIS_URL) as redis_url, listening(tmp, redis_url, artim_timeout=ARTIM, max_dataset_mb=1,
                                                          max_pdu_size=MAX_PDU) as (port, listener, data_dir):
        target = Target(port, listener, data_dir)
        target.well_behaved()  # everything a store touches is loaded before the baseline
        target.baseline_rss = target.rss()
        yield target


@contextmanager
def connections(port: int, payloads: list[bytes]):
    """One TCP connection per payload, each sending its payload and then nothing."""
    socks = []
    try:
        for payload in payloads:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if payload:
                s.sendall(payload)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_listener(s: socket.socket, within: float) -> bytes:
    """What the listener sent before closing ``s`` (fails if it is still open after ``within`` s)."""
    s.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"connection still open after {within} s")


def associate(port: int, *, max_pdu: int = 0):
    ae = AE(ae_title="HOSTILE")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN")
    assert assoc.is_established
    return assoc


def film_of(nbytes: int):
    """A CR film whose pixel data is about ``nbytes``, and its encoded data set."""
    ds = chest_dataset(sop_class="CR")
    side = int(nbytes ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(7).integers(0, 255, side * side, dtype=np.uint8).tobytes()
    return ds, encode(ds, False, True)


def test_pdu_headers_claiming_4_gb_are_refused_without_allocating(target):
    with connections(target.port, [struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 0xFFFFFFF0)] * 10) as socks:
        target.well_behaved()
        for s in socks:
            assert closed_by_listener(s, within=2) == b""  # no association, no A-ASSOCIATE-AC
    target.assert_healthy()
    assert "A-ASSOCIATE-RQ of 4294967280 bytes" in target.listener.log()


def test_random_bytes_on_20_connections(target):
    rng = random.Random(21)
    with connections(target.port, [rng.randbytes(4096) for _ in range(20)]) as socks:
        target.well_behaved()
        for s in socks:
            closed_by_listener(s, within=ARTIM + 3)
    target.assert_healthy()


def test_an_association_request_whose_fields_do_not_build_is_refused_without_a_traceback(target):
    """An A-ASSOCIATE-RQ that decodes but whose presentation contexts carry even IDs (PS3.8 9.3.2.2:
    odd, 1-255): pynetdicom checks that only when its state machine builds the request's primitive,
    in the association's reactor thread, which the error ended with a traceback."""
    request = bytearray(association_rq())
    offset, evened = 6 + 68, 0  # the PDU header, the fixed fields, then the variable items
    while offset < len(request):
        item_type, length = request[offset], struct.unpack(">H", request[offset + 2:offset + 4])[0]
        if item_type == 0x20:  # a presentation context item: its ID is its first byte
            request[offset + 4] = 2 * (evened + 1)
            evened += 1
        offset += 4 + length
    assert evened == 2
    before = target.listener.log()
    with connections(target.port, [bytes(request)] * 3) as socks:
        for s in socks:
            closed_by_listener(s, within=ARTIM + 3)
    assert "Traceback" not in target.listener.log()[len(before):]
    target.assert_healthy()


def test_p_data_before_any_association_is_closed(target):
    pdv = struct.pack(">LB", 2, 1) + b"\x03"
    with connections(target.port, [struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv]) as [s]:
        assert closed_by_listener(s, within=1.5) == b""
    target.assert_healthy()


def test_p_data_one_byte_over_the_maximum_is_aborted(target):
    assoc = associate(target.port)
    try:
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", P_DATA_TF, 0, MAX_PDU + 1) + bytes(1024))
        wait_until(lambda: assoc.is_aborted, timeout=5, interval=0.05, what="the listener aborts")
    finally:
        assoc.abort()
    target.assert_healthy()


def test_p_data_at_the_maximum_is_received(target):
    ds, _ = film_of(900_000)
    assoc = associate(target.port)  # pynetdicom fills every PDU to the listener's maximum
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    target.stored.append(str(ds.SOPInstanceUID))
    target.assert_healthy()


def test_100_idle_connections_neither_block_nor_stay(target):
    with connections(target.port, [b""] * 100) as socks:
        time.sleep(0.5)
        target.well_behaved()
        for s in socks:
            closed_by_listener(s, within=ARTIM + 3)
    target.assert_healthy()


def test_40_idle_connections_closed_by_their_peer_free_every_slot(target):
    with connections(target.port, [b""] * 40):
        time.sleep(1)
        target.well_behaved()
    target.well_behaved()
    target.assert_healthy()


def test_a_pdu_sent_a_byte_at_a_time_is_cut_at_the_artim_deadline(target):
    started = time.monotonic()
    with connections(target.port, [struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 200)] * 5) as socks:
        open_socks = list(socks)
        while open_socks and time.monotonic() - started < ARTIM + 3:
            for s in list(open_socks):
                try:
                    s.send(b"\x00")
                except OSError:
                    open_socks.remove(s)
            time.sleep(0.25)
        assert not open_socks, "slow connections outlived the ARTIM deadline"
    assert time.monotonic() - started < ARTIM + 2
    target.assert_healthy()


def test_a_data_set_over_the_limit_is_aborted_and_not_kept(target):
    ds, _ = film_of(1_500_000)  # the listener takes 1 MB at most
    assoc = associate(target.port)
    try:
        response = assoc.send_c_store(ds)
        assert "Status" not in response
        wait_until(lambda: assoc.is_aborted, timeout=5, interval=0.05, what="the listener aborts")
    finally:
        assoc.abort()
    target.assert_healthy()
    assert str(ds.SOPInstanceUID) not in target.recorded()


def test_a_data_set_cut_off_midway_leaves_no_file(target):
    ds, encoded = film_of(800_000)
    assoc = associate(target.port)
    context = assoc.accepted_contexts[0]
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(context.context_id, assoc.acceptor.maximum_length))
    for fragment in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(fragment)
    time.sleep(0.5)
    incoming = target.data_dir / "incoming"
    assert list(incoming.iterdir()), "the half data set should be in incoming/ while the association lasts"
    assoc.abort()
    target.assert_healthy()
    assert str(ds.SOPInstanceUID) not in target.recorded()
