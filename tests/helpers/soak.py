"""The chaos soak: the production topology under load while its processes are killed and its
Redis and PostgreSQL restarted on a fixed, seeded schedule; then an account of every instance.

The topology (tests/helpers/topology.py) runs the listener with 2 processes sharing the port,
one preprocess worker, one inference worker and beat, over a private Redis (no persistence: a
restart loses every queued message) and a private PostgreSQL. Four senders, each on its own
association, C-STORE studies of 2 to 6 images, a mix of 2 MB 12-bit CR films and small 8-bit
ones, and behave as a PACS does: what was not answered with success is sent again once the
listener answers. A sink on its own port takes the SRs the workers send back.

A fault thread follows the schedule by progress (received + predicted, over twice the count):
each process kind (listener, listener receiver, preprocess, inference, beat) is killed with
SIGKILL ``kills_per_kind`` times and started again after a seeded pause, as a supervisor would;
Redis is restarted twice and PostgreSQL once.

At the end the report counts what matters: instances answered with success that are not
PREDICTED (lost), predicted more than once per model version (duplicated) or still in flight
(stuck); studies whose report was sent twice with different UIDs for the same content, studies
without a report covering every acknowledged image; spool files without a row and rows without
their file; resident memory per process kind (first sample, peak, last); throughput and latency.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from db.deliveries import unreported_studies
from db.models import DeliveryState, Instance, Prediction, ResultDelivery, utcnow
from dicom_io.sr import read_screening_report
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG
from tests.helpers.processes import free_port, wait_until
from tests.helpers.topology import Topology

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

KINDS = ("listener", "receiver", "preprocess", "inference", "beat")
SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007}
TERMINAL = ("PREDICTED", "SKIPPED", "FAILED")


@dataclass(frozen=True)
class Film:
    index: int
    study_uid: str
    series_uid: str
    sop_uid: str
    large: bool
    pneumonia: bool


def plan(count: int, seed: int, associations: int) -> list[list[Film]]:
    """``count`` films in studies of 2 to 6 images, half the studies 2 MB CR; the studies dealt
    round-robin to the associations. The same seed gives the same UIDs."""
    rng = random.Random(seed)
    lanes: list[list[Film]] = [[] for _ in range(associations)]
    index = study = 0
    while index < count:
        size = min(rng.randint(2, 6), count - index)
        large, study_uid, series_uid = rng.random() < 0.5, _uid(seed, "study", study), _uid(seed, "series", study)
        for _ in range(size):
            lanes[study % associations].append(Film(index, study_uid, series_uid, _uid(seed, "sop", index), large,
                                                    rng.random() < 0.5))
            index += 1
        study += 1
    return lanes


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=[f"pneumoscreen-soak-{seed}", *map(str, parts)])


class Films:
    """Datasets for the films, from the fixture JPEGs decoded once."""

    def __init__(self) -> None:
        self.pixels: dict[tuple[bool, bool], tuple[bytes, int, int]] = {}
        for pneumonia, path in ((False, NORMAL_JPEG), (True, PNEUMONIA_JPEG)):
            grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            large = (cv2.resize(grey, (1024, 1024)).astype(np.uint16) * 16).tobytes()  # 12 bits stored, 2 MiB
            self.pixels[(True, pneumonia)] = (large, 1024, 1024)
            self.pixels[(False, pneumonia)] = (grey.tobytes(), *grey.shape)

    def dataset(self, film: Film) -> Dataset:
        pixels, rows, columns = self.pixels[(film.large, film.pneumonia)]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = film.sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = film.study_uid, film.series_uid
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.PatientName, ds.PatientID = "Soak^Patient", f"SOAK{film.study_uid[-8:]}"
        ds.AccessionNumber, ds.StudyDate, ds.StudyTime = f"S{film.study_uid[-10:]}", "20261129", "080000"
        ds.SeriesNumber, ds.InstanceNumber = 1, film.index + 1
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        bits = 12 if film.large else 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16 if film.large else 8, bits, bits - 1, 0
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW" if film.large else "OB"
        return ds


@dataclass
class SenderStats:
    acked: dict[str, float] = field(default_factory=dict)  # SOP Instance UID -> when answered with success
    refused: collections.Counter = field(default_factory=collections.Counter)  # status -> count
    unanswered: int = 0  # C-STOREs that got no answer (association gone)
    associations: int = 0
    failed_associations: int = 0


class Sender(threading.Thread):
    """One association's worth of studies, sent as a PACS would: again until answered with success."""

    def __init__(self, port: int, films: list[Film], factory: Films, stats: SenderStats, lock: threading.Lock,
                 deadline: float) -> None:
        super().__init__(daemon=True)
        self.port, self.films, self.factory = port, films, factory
        self.stats, self.lock, self.deadline = stats, lock, deadline

    def run(self) -> None:
        ae = AE(ae_title="SOAKPACS")
        ae.maximum_pdu_size = 0
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        pending = collections.deque(self.films)
        while pending and time.monotonic() < self.deadline:
            try:
                assoc = ae.associate("127.0.0.1", self.port, ae_title="PNEUMOSCREEN")
            except (OSError, RuntimeError):
                assoc = None
            if assoc is None or not assoc.is_established:
                with self.lock:
                    self.stats.failed_associations += 1
                time.sleep(0.5)
                continue
            with self.lock:
                self.stats.associations += 1
            try:
                while pending and assoc.is_established and time.monotonic() < self.deadline:
                    film = pending[0]
                    try:
                        status = assoc.send_c_store(self.factory.dataset(film))
                    except (OSError, RuntimeError, ValueError):
                        status = Dataset()
                    code = int(status.Status) if "Status" in status else None
                    with self.lock:
                        if code in SUCCESS:
                            self.stats.acked[film.sop_uid] = time.monotonic()
                        elif code is None:
                            self.stats.unanswered += 1
                        else:
                            self.stats.refused[f"0x{code:04X}"] += 1
                    if code in SUCCESS:
                        pending.popleft()
                    elif code is None:
                        break
                    else:
                        time.sleep(0.5)  # refused (the database or the spool is not there): later, same film
            finally:
                if assoc.is_established:
                    assoc.release()


class ReportSink:
    """A storage SCP that keeps every SR it is sent (duplicates included)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="SOAKSINK")
        ae.maximum_pdu_size = 0
        for sop_class in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    @property
    def destination(self) -> str:
        return f"SOAKSINK@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()


class Monitor(threading.Thread):
    """Every second: resident memory of each process kind and the number of PREDICTED instances."""

    def __init__(self, topology: Topology) -> None:
        super().__init__(daemon=True)
        self.topology = topology
        self.rss: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.predicted = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(1.0):
            pids = {kind: [p.proc.pid] for kind, p in list(self.topology.processes.items())}
            pids["receiver"] = self.topology.receiver_pids()
            for kind, group in pids.items():
                values = [_rss_mb(pid) for pid in group]
                values = [v for v in values if v]
                if values:
                    self.rss[kind].append(max(values))
            try:
                with self.topology.engine.connect() as c:
                    self.predicted = c.scalar(select(func.count()).where(Instance.state == "PREDICTED"))
            except SQLAlchemyError:
                pass  # PostgreSQL restarting: the last figure stands

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def fault_schedule(seed: int, kills_per_kind: int, redis_restarts: int, postgres_restarts: int):
    """(progress at which it fires, fault, pause before the restart in seconds), in order."""
    rng = random.Random(seed)
    faults = [f"kill {kind}" for kind in KINDS for _ in range(kills_per_kind)]
    faults += ["restart redis"] * redis_restarts + ["restart postgresql"] * postgres_restarts
    rng.shuffle(faults)
    points = sorted(rng.uniform(0.03, 0.85) for _ in faults)
    return [(round(at, 3), fault, round(rng.uniform(0.5, 3.0), 2)) for at, fault in zip(points, faults)]


@dataclass
class SoakReport:
    count: int
    seed: int
    associations: int
    listener_processes: int
    faults: list[dict]
    faults_injected: dict[str, int]
    acknowledged: int
    not_acknowledged: int
    refused_answers: dict[str, int]
    unanswered_stores: int
    associations_opened: int
    associations_refused: int
    lost: int
    duplicated: int
    stuck: int
    failed_or_skipped: int
    states: dict[str, int]
    reports_received: int
    reports_distinct: int
    reports_conflicting: int
    studies: int
    studies_without_full_report: int
    deliveries: dict[str, int]
    spool_files: int
    orphan_files: int
    rows_without_file: int
    rss_mb: dict[str, dict[str, float]]
    seconds_to_send: float
    seconds_to_last_predicted: float
    images_per_second: float
    latency_received_to_predicted_s: dict[str, float]
    reconciler_resent: int
    tracebacks: int
    examples: dict[str, list[str]]

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def sound(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.not_acknowledged or self.reports_conflicting
                    or self.studies_without_full_report or self.orphan_files or self.rows_without_file)


class Soak:
    def __init__(self, workdir: Path, *, count: int, seed: int = 19, associations: int = 4,
                 kills_per_kind: int = 3, redis_restarts: int = 2, postgres_restarts: int = 1,
                 listener_processes: int = 2, reconcile_after_seconds: float = 120, send_seconds: float = 3600,
                 drain_seconds: float = 900) -> None:
        self.workdir, self.count, self.seed, self.associations = workdir, count, seed, associations
        self.listener_processes, self.reconcile_after_seconds = listener_processes, reconcile_after_seconds
        self.schedule = fault_schedule(seed, kills_per_kind, redis_restarts, postgres_restarts)
        self.send_seconds, self.drain_seconds = send_seconds, drain_seconds
        self.lanes = plan(count, seed, associations)
        self.stats = SenderStats()
        self.faults: list[dict] = []

    def run(self, progress=None) -> SoakReport:
        """``progress(acknowledged, predicted)`` is called every second while it runs."""
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # an aborted association is the point here
        sink = ReportSink()
        topology = Topology(self.workdir, listener_processes=self.listener_processes,
                            results_destination=sink.destination, study_quiet_seconds=2,
                            reconcile_after_seconds=self.reconcile_after_seconds,
                            reconcile_interval_seconds=min(10.0, self.reconcile_after_seconds / 4),
                            results_claim_seconds=max(10.0, self.reconcile_after_seconds),
                            inference_batch_size=32, min_free_mb=64, log_level="WARNING")
        monitor = Monitor(topology)
        try:
            wait_until(lambda: len(topology.receiver_pids()) == self.listener_processes - 1, timeout=60,
                       what="the listener's receivers")
            time.sleep(8)  # the inference worker loads TensorFlow and the model
            monitor.start()
            lock, factory = threading.Lock(), Films()
            started = self._started = time.monotonic()
            senders = [Sender(topology.port, lane, factory, self.stats, lock, started + self.send_seconds)
                       for lane in self.lanes]
            for sender in senders:
                sender.start()
            stop_faults = threading.Event()
            # the intake's faults follow what was received, the others what was received and predicted
            intake = [event for event in self.schedule if event[1] in ("kill listener", "kill receiver")]
            fault_threads = [
                threading.Thread(target=self._inject, args=(topology, events, stop_faults, measure), daemon=True)
                for events, measure in (
                    (intake, lambda: len(self.stats.acked) / self.count),
                    ([e for e in self.schedule if e not in intake],
                     lambda: (len(self.stats.acked) + monitor.predicted) / (2 * self.count)))]
            for thread in fault_threads:
                thread.start()
            while any(s.is_alive() for s in senders):
                time.sleep(1)
                if progress:
                    progress(len(self.stats.acked), monitor.predicted)
            sent_at = time.monotonic()
            acked = set(self.stats.acked)
            deadline = time.monotonic() + self.drain_seconds
            while time.monotonic() < deadline and (any(t.is_alive() for t in fault_threads)
                                                    or monitor.predicted < len(acked)):
                time.sleep(1)
                if progress:
                    progress(len(acked), monitor.predicted)
            stop_faults.set()
            for thread in fault_threads:
                thread.join(timeout=120)
            last_predicted = self._wait_for_the_end(topology, sink.destination, acked, deadline)
            time.sleep(3)  # the last reports reach the sink
            monitor.stop()
            return self._report(topology, sink, monitor, acked, started, sent_at, last_predicted)
        finally:
            monitor.stop()
            topology.close()
            sink.stop()

    def _inject(self, topology: Topology, schedule: list, stop: threading.Event, progress) -> None:
        rng = random.Random(f"{self.seed}-{schedule[:1]}")
        for at, fault, pause in schedule:
            while not stop.is_set() and progress() < at:
                stop.wait(0.2)
            if stop.is_set():
                return
            record = {"at_progress": at, "fault": fault, "pause_s": pause, "seconds": round(time.monotonic() - self._started, 1),
                      "acknowledged": len(self.stats.acked)}
            kind = fault.split()[1]
            if fault.startswith("kill "):
                if kind == "receiver":
                    record["pid"] = topology.kill_receiver()
                else:
                    record["pid"] = topology.processes[kind].proc.pid
                    topology.kill(kind)
                    time.sleep(pause)
                    topology.start(kind)
            elif kind == "redis":
                topology.redis.stop()
                time.sleep(pause + 1)
                topology.redis.start()
            else:
                topology.postgres.stop()
                time.sleep(pause + 4)
                topology.postgres.start()
            self.faults.append(record)
            stop.wait(rng.uniform(0.5, 2.0))  # the next fault does not land on the same restart

    def _wait_for_the_end(self, topology: Topology, destination: str, acked: set[str], deadline: float) -> float:
        """Until every acknowledged instance has ended, no report is pending and none is left
        unasked (the reconciler asks for those); when that was."""
        def ended():
            try:
                with topology.engine.connect() as c:
                    open_instances = c.scalar(select(func.count()).where(Instance.state.not_in(TERMINAL)))
                    terminal = c.scalar(select(func.count()).where(Instance.state.in_(TERMINAL)))
                    open_reports = c.scalar(select(func.count()).select_from(ResultDelivery).where(
                        ResultDelivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING])))
                with Session(topology.engine) as session:
                    unasked = unreported_studies(session, destination=destination, answered_since=EPOCH,
                                                 answered_before=utcnow() + timedelta(days=1))
            except SQLAlchemyError:
                return False
            return open_instances == 0 and terminal >= len(acked) and open_reports == 0 and not unasked

        try:
            wait_until(ended, timeout=max(10.0, deadline - time.monotonic()), interval=1, what="the end")
        except TimeoutError as exc:
            log.error("%s", exc)
        with topology.engine.connect() as c:
            last = c.scalar(select(func.max(Prediction.created_at)))
            first = c.scalar(select(func.min(Instance.received_at)))
        return (last - first).total_seconds() if last and first else float("nan")

    def _report(self, topology: Topology, sink: ReportSink, monitor: Monitor, acked: set[str], started: float,
                sent_at: float, last_predicted: float) -> SoakReport:
        films = {film.sop_uid: film for lane in self.lanes for film in lane}
        with topology.engine.connect() as c:
            rows = c.execute(select(Instance.SOPInstanceUID.label("uid"), Instance.state, Instance.path,
                                    Instance.received_at, Instance.reason)).all()
            per_version = c.execute(select(Prediction.instance_id, Prediction.model_version, func.count())
                                    .group_by(Prediction.instance_id, Prediction.model_version)).all()
            predicted_at = dict(c.execute(select(Instance.SOPInstanceUID, func.min(Prediction.created_at))
                                          .join(Prediction, Prediction.instance_id == Instance.id)
                                          .group_by(Instance.SOPInstanceUID)).all())
            deliveries = dict(c.execute(select(ResultDelivery.state, func.count())
                                        .group_by(ResultDelivery.state)).all())
        state = {row.uid: getattr(row.state, "value", row.state) for row in rows}
        lost = sorted(uid for uid in acked if state.get(uid) != "PREDICTED")
        stuck = sorted(uid for uid, s in state.items() if s not in TERMINAL)
        duplicated = sum(1 for *_, n in per_version if n > 1)
        latencies = sorted((predicted_at[row.uid] - row.received_at).total_seconds()
                           for row in rows if row.uid in predicted_at)

        content: dict[tuple[str, frozenset], set[str]] = collections.defaultdict(set)
        covered: dict[str, list[frozenset]] = collections.defaultdict(list)
        for ds in sink.received:
            report = read_screening_report(ds)
            images = frozenset(image.sop_instance_uid for image in report.images)
            content[(report.study_instance_uid, images)].add(str(ds.SOPInstanceUID))
            covered[report.study_instance_uid].append(images)
        acked_by_study: dict[str, set[str]] = collections.defaultdict(set)
        for uid in acked:
            acked_by_study[films[uid].study_uid].add(uid)
        without_full = [study for study, uids in acked_by_study.items()
                        if not any(uids <= images for images in covered.get(study, ()))]

        spool_root = topology.data_dir / "spool"
        files = {p.resolve() for p in spool_root.rglob("*") if p.is_file()}
        paths = {Path(row.path).resolve() for row in rows if row.path}
        refused = dict(self.stats.refused)
        logs = "".join(p.read_text(errors="replace") for p in self.workdir.glob("*.log"))
        sent_seconds = sent_at - started
        return SoakReport(
            count=self.count, seed=self.seed, associations=self.associations,
            listener_processes=self.listener_processes, faults=self.faults,
            faults_injected=dict(collections.Counter(f["fault"] for f in self.faults)),
            acknowledged=len(acked), not_acknowledged=self.count - len(acked), refused_answers=refused,
            unanswered_stores=self.stats.unanswered, associations_opened=self.stats.associations,
            associations_refused=self.stats.failed_associations,
            lost=len(lost), duplicated=duplicated, stuck=len(stuck),
            failed_or_skipped=sum(1 for s in state.values() if s in ("FAILED", "SKIPPED")),
            states=dict(collections.Counter(state.values())),
            reports_received=len(sink.received), reports_distinct=len({str(ds.SOPInstanceUID) for ds in sink.received}),
            reports_conflicting=sum(1 for uids in content.values() if len(uids) > 1),
            studies=len(acked_by_study), studies_without_full_report=len(without_full),
            deliveries={getattr(k, "value", k): n for k, n in deliveries.items()},
            spool_files=len(files), orphan_files=len(files - paths), rows_without_file=len(paths - files),
            rss_mb={kind: {"first": round(values[0], 1), "peak": round(max(values), 1), "last": round(values[-1], 1)}
                    for kind, values in monitor.rss.items() if values},
            seconds_to_send=round(sent_seconds, 1), seconds_to_last_predicted=round(last_predicted, 1),
            images_per_second=round(len(acked) / last_predicted, 1) if math.isfinite(last_predicted) else 0.0,
            latency_received_to_predicted_s={
                "p50": round(statistics.median(latencies), 2) if latencies else float("nan"),
                "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else float("nan"),
                "max": round(latencies[-1], 2) if latencies else float("nan")},
            reconciler_resent=sum(int(line.split("re-sent ")[1].split()[0]) for line in logs.splitlines()
                                  if "reconciler re-sent" in line),
            tracebacks=logs.count("Traceback"),
            examples={"lost": lost[:5], "stuck": stuck[:5], "orphan_files": sorted(map(str, files - paths))[:5],
                      "reasons": sorted({row.reason for row in rows if row.reason})[:5]},
        )
