"""A bounded, seeded fuzzer of the DICOM listener's network side, shared by
``bench/fuzz.py network`` (long) and ``tests/test_network_fuzz.py`` (short).

While a well-behaved sender stores films over fresh associations and a prober sends C-ECHO
every half second, each case opens a connection and misbehaves: random bytes; a valid
A-ASSOCIATE-RQ cut short, with a lying length, or sent a byte at a time (slowloris); PDU headers
of every type with huge or wrong lengths; P-DATA before any association; more associations than
allowed, held; a C-STORE stopped after a random number of its fragments by an A-ABORT, an
A-RELEASE-RQ or a dropped connection; a valid association's byte stream with flipped bits.
"""

from __future__ import annotations

import io
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation

from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG, chest_dataset

CASES = ("random_bytes", "cut_rq", "lying_rq_length", "slow_rq", "huge_header", "wrong_fixed_length",
         "p_data_first", "too_many_associations", "store_cut_by_abort", "store_cut_by_release",
         "store_cut_by_drop", "flipped_stream")


def association_rq(calling: str = "FUZZER", called: str = "PNEUMOSCREEN") -> bytes:
    """The bytes of a valid A-ASSOCIATE-RQ offering Verification and CR storage."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 104)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    contexts = []
    for number, syntax in enumerate((Verification, ComputedRadiographyImageStorage)):
        cx = build_context(syntax, [ExplicitVRLittleEndian])
        cx.context_id = 2 * number + 1
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16384
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.10.9"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


@dataclass
class FuzzReport:
    cases: Counter = field(default_factory=Counter)
    stored: list[str] = field(default_factory=list)
    store_failures: list[str] = field(default_factory=list)
    echoes: int = 0
    echo_failures: int = 0
    rejections: int = 0
    aborts: int = 0
    """Associations of the well-behaved peers rejected while every slot was taken (then retried)."""
    slowest_echo_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    end_rss_mb: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"cases": dict(self.cases), "cases_total": sum(self.cases.values()), "stored": len(self.stored),
                "store_failures": len(self.store_failures), "rejected_then_retried": self.rejections,
                "aborted_then_retried": self.aborts, "echoes": self.echoes, "echo_failures": self.echo_failures, "slowest_echo_s": round(self.slowest_echo_s, 3),
                "rss_mb": {"start": round(self.start_rss_mb, 1), "peak": round(self.peak_rss_mb, 1),
                           "end": round(self.end_rss_mb, 1)}, "seconds": round(self.seconds, 1)}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class NetworkFuzzer:
    def __init__(self, port: int, listener_pid: int, *, seed: int, max_associations: int = 16) -> None:
        self.port = port
        self.pid = listener_pid
        self.rng = random.Random(seed)
        self.max_associations = max_associations
        self.report = FuzzReport()
        self._stop = threading.Event()
        self._rq = association_rq()
        self._ds = chest_dataset(PNEUMONIA_JPEG, sop_class="CR")

    # --- the well-behaved peers beside the fuzzer -------------------------------------------------
    def _sender(self) -> None:
        n = 0
        while not self._stop.is_set():
            ds = chest_dataset(NORMAL_JPEG if n % 2 else PNEUMONIA_JPEG, sop_class="CR", accession=f"NF{n:05d}")
            n += 1
            assoc = self._associate("GOODPEER", ComputedRadiographyImageStorage, timeout=30)
            if assoc is None:
                self.report.store_failures.append(f"{ds.SOPInstanceUID}: no association within 30 s")
                continue
            status = assoc.send_c_store(ds)
            assoc.release()
            if "Status" in status and int(status.Status) == 0:
                self.report.stored.append(str(ds.SOPInstanceUID))
            else:
                self.report.store_failures.append(f"{ds.SOPInstanceUID}: status {status.get('Status')}")
            self._stop.wait(0.2)

    def _prober(self) -> None:
        while not self._stop.is_set():
            self.report.peak_rss_mb = max(self.report.peak_rss_mb, _rss_mb(self.pid))
            started = time.monotonic()
            # as a PACS retries: longer than the hoarding case holds every slot on a slow machine (5.6 s seen)
            assoc = self._associate("PROBER", Verification, timeout=15)
            ok = False
            if assoc is not None:
                status = assoc.send_c_echo()
                ok = "Status" in status and int(status.Status) == 0
                assoc.release()
            self.report.echoes += 1
            self.report.echo_failures += 0 if ok else 1
            self.report.slowest_echo_s = max(self.report.slowest_echo_s, time.monotonic() - started)
            self._stop.wait(0.5)

    def _associate(self, calling: str, sop_class: str, *, timeout: float):
        """An association as a PACS gets one: a rejection (every slot taken) or an abort is retried,
        as a PACS's send queue retries, for up to ``timeout`` seconds. Counts each; None if it never
        got one."""
        deadline = time.monotonic() + timeout
        while True:
            ae = AE(ae_title=calling)
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
            assoc = ae.associate("127.0.0.1", self.port, ae_title="PNEUMOSCREEN")
            if assoc.is_established:
                return assoc
            if assoc.is_rejected:
                self.report.rejections += 1
            else:
                self.report.aborts += 1
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    # --- the cases ---------------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def _drain(self, sock: socket.socket, seconds: float) -> None:
        """Read what the listener answers until it closes or ``seconds`` pass."""
        sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def case_random_bytes(self) -> None:
        with self._connect() as s:
            s.sendall(self.rng.randbytes(self.rng.randint(1, 8192)))
            self._drain(s, 1.0)

    def case_cut_rq(self) -> None:
        with self._connect() as s:
            s.sendall(self._rq[:self.rng.randint(1, len(self._rq) - 1)])
            if self.rng.random() < 0.5:
                self._drain(s, 0.5)  # and then the peer goes

    def case_lying_rq_length(self) -> None:
        claimed = max(0, len(self._rq) - 6 + self.rng.choice([-50, -1, 1, 50, 10_000, 2 ** 31]))
        with self._connect() as s:
            s.sendall(self._rq[:2] + struct.pack(">L", claimed) + self._rq[6:])
            self._drain(s, 1.0)

    def case_slow_rq(self) -> None:
        with self._connect() as s:
            for byte in self._rq[:self.rng.randint(8, 40)]:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

    def case_huge_header(self) -> None:
        with self._connect() as s:
            s.sendall(struct.pack(">BBL", self.rng.randint(1, 7), 0, self.rng.choice([2 ** 32 - 1, 2 ** 31, 2 ** 24])))
            self._drain(s, 1.0)

    def case_wrong_fixed_length(self) -> None:
        with self._connect() as s:
            s.sendall(self._rq)
            self._drain_ac(s)
            pdu_type = self.rng.choice([0x05, 0x06, 0x07, 0x03])
            s.sendall(struct.pack(">BBL", pdu_type, 0, self.rng.choice([0, 3, 5, 1000])) + bytes(8))
            self._drain(s, 1.0)

    def _drain_ac(self, s: socket.socket) -> None:
        s.settimeout(5)
        try:
            s.recv(65536)
        except OSError:
            pass

    def case_p_data_first(self) -> None:
        pdv = struct.pack(">LBB", 2, 1, 3)
        with self._connect() as s:
            s.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
            self._drain(s, 1.0)

    def case_too_many_associations(self) -> None:
        held = []
        try:
            for _ in range(self.max_associations + 4):
                ae = AE(ae_title="HOARDER")
                ae.add_requested_context(Verification)
                ae.acse_timeout = 5
                assoc = ae.associate("127.0.0.1", self.port, ae_title="PNEUMOSCREEN")
                held.append(assoc)
            time.sleep(0.5)
        finally:
            for assoc in held:
                if assoc.is_established:
                    assoc.release()

    def _store_fragments(self):
        ae = AE(ae_title="CUTTER")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PNEUMOSCREEN")
        if not assoc.is_established:
            return assoc, []
        ds = chest_dataset(PNEUMONIA_JPEG, sop_class="CR")
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        request.DataSet = io.BytesIO(encode(ds, False, True))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 4096))
        return assoc, fragments[:self.rng.randint(0, len(fragments) - 1)]

    def _store_cut(self, how: str) -> None:
        """A C-STORE stopped after a random number of its fragments: by an A-ABORT, an A-RELEASE-RQ
        (which the listener must refuse mid-message) or the connection dropped."""
        assoc, fragments = self._store_fragments()
        for fragment in fragments:
            assoc.dul.send_pdu(fragment)
        time.sleep(0.05)
        if how == "release" and assoc.is_established:
            assoc.release()
            return
        sock = getattr(assoc.dul.socket, "socket", None)
        if how == "drop" and sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assoc.abort()

    def case_store_cut_by_abort(self) -> None:
        self._store_cut("abort")

    def case_store_cut_by_release(self) -> None:
        self._store_cut("release")

    def case_store_cut_by_drop(self) -> None:
        self._store_cut("drop")

    def case_flipped_stream(self) -> None:
        stream = bytearray(self._rq + self._echo_pdata())
        for _ in range(self.rng.randint(1, 16)):
            position = self.rng.randrange(len(stream))
            stream[position] ^= 1 << self.rng.randrange(8)
        with self._connect() as s:
            try:
                s.sendall(bytes(stream))
            except OSError:
                return
            self._drain(s, 1.0)

    @staticmethod
    def _echo_pdata() -> bytes:
        """A C-ECHO-RQ on presentation context 1, as P-DATA-TF bytes."""
        request = C_ECHO()
        request.MessageID = 1
        request.AffectedSOPClassUID = Verification
        message = C_ECHO_RQ()
        message.primitive_to_message(request)
        out = b""
        for primitive in message.encode_msg(1, 16384):
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            out += pdu.encode()
        return out

    def run(self, *, count: int, seconds: float, workers: int = 4) -> FuzzReport:
        self.report.start_rss_mb = self.report.peak_rss_mb = _rss_mb(self.pid)
        started = time.monotonic()
        helpers = [threading.Thread(target=self._sender, daemon=True), threading.Thread(target=self._prober,
                                                                                        daemon=True)]
        for t in helpers:
            t.start()
        plan = [CASES[i % len(CASES)] for i in range(count)]
        self.rng.shuffle(plan)
        lock = threading.Lock()

        def attack() -> None:
            while time.monotonic() - started < seconds:
                with lock:
                    if not plan:
                        return
                    name = plan.pop()
                try:
                    getattr(self, f"case_{name}")()
                except OSError:
                    pass  # the listener closed on us: what a hostile peer deserves
                with lock:
                    self.report.cases[name] += 1

        attackers = [threading.Thread(target=attack, daemon=True) for _ in range(workers)]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join()
        time.sleep(1.0)
        self._stop.set()
        for t in helpers:
            t.join(timeout=30)
        self.report.seconds = time.monotonic() - started
        self.report.end_rss_mb = _rss_mb(self.pid)
        return self.report
