"""Whatever dies, every instance answered with success ends PREDICTED exactly once.

The production topology as separate processes: listener, preprocess worker,
inference worker and beat (reconciling every second), over a private Redis
and a private PostgreSQL that the tests kill and restart.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import create_engine, func, select, text

from db.models import Instance, Prediction
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG, chest_dataset
from tests.helpers.processes import Process, cli_env, free_port, run_cli, wait_for_port, wait_until
from tests.helpers.services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.slow
COUNT = 40


class Topology:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.redis = PrivateRedis(tmp_path)
        self.postgres = PrivatePostgres()
        self.port = free_port()
        self.env = cli_env(database_url=self.postgres.url, broker_url=self.redis.url, data_dir=tmp_path / "data",
                           port=self.port, study_quiet_seconds=1, reconcile_after_seconds=4,
                           reconcile_interval_seconds=1, inference_batch_size=8)
        run_cli("db", "upgrade", env=self.env)
        self.processes: dict[str, Process] = {}
        self.engine = create_engine(self.postgres.url, pool_pre_ping=True)
        for name in ("listener", "preprocess", "inference", "beat"):
            self.start(name)
        wait_for_port(self.port, self.processes["listener"].proc)

    _ARGS = {"listener": ["listen"], "preprocess": ["worker", "--queues", "preprocess,maintenance"],
             "inference": ["worker", "--queues", "inference"], "beat": ["beat"]}

    def start(self, name: str) -> None:
        n = sum(1 for p in self.tmp_path.glob(f"{name}*.log"))
        self.processes[name] = Process(self._ARGS[name], self.env, self.tmp_path / f"{name}{n}.log")

    def kill(self, name: str) -> None:
        proc = self.processes.pop(name)
        proc.proc.kill()
        proc.proc.wait(timeout=10)
        proc.stop()

    def send(self, count: int = COUNT, *, on_success=None) -> dict[str, int]:
        """C-STORE ``count`` films over one association; SOP Instance UID -> status (-1: no answer)."""
        statuses: dict[str, int] = {}
        ae = AE(ae_title="FAULTS")
        ds0 = chest_dataset(PNEUMONIA_JPEG)
        ae.add_requested_context(ds0.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PNEUMOSCREEN")
        assert assoc.is_established
        try:
            for i in range(count):
                ds = chest_dataset(PNEUMONIA_JPEG if i % 2 else NORMAL_JPEG, accession=f"F{i:03d}")
                if not assoc.is_established:
                    statuses[str(ds.SOPInstanceUID)] = -1
                    continue
                status = assoc.send_c_store(ds)
                statuses[str(ds.SOPInstanceUID)] = int(status.Status) if "Status" in status else -1
                if statuses[str(ds.SOPInstanceUID)] == 0 and on_success is not None:
                    on_success(sum(1 for s in statuses.values() if s == 0))
        finally:
            if assoc.is_established:
                assoc.release()
        return statuses

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            rows = c.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
        return {state.value if hasattr(state, "value") else state: n for state, n in rows}

    def reasons(self) -> list[str]:
        with self.engine.connect() as c:
            return sorted(set(c.scalars(select(Instance.reason).where(Instance.reason.is_not(None)))))

    def log_excerpts(self, lines: int = 15) -> str:
        """The last warnings and errors of every process, for a failure report."""
        out = []
        for path in sorted(self.tmp_path.glob("*.log")):
            hits = [line for line in path.read_text(errors="replace").splitlines()
                    if " WARNING " in line or " ERROR " in line or "Traceback" in line]
            out.append(f"--- {path.name}\n" + "\n".join(hits[-lines:]))
        return "\n".join(out)

    def assert_exactly_once(self, succeeded: set[str]) -> None:
        def done():
            try:
                with self.engine.connect() as c:
                    failed = set(c.scalars(select(Instance.SOPInstanceUID).where(Instance.state == "FAILED")))
                    predicted = set(c.scalars(select(Instance.SOPInstanceUID).where(Instance.state == "PREDICTED")))
            except Exception:  # the database may be restarting
                return False
            assert not failed & succeeded, f"acknowledged instances FAILED: {self.reasons()}"
            return succeeded <= predicted

        try:
            wait_until(done, timeout=180, interval=1, what=f"{len(succeeded)} instances PREDICTED")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nstates: {self.counts()}\nreasons: {self.reasons()}\n"
                                 f"{self.log_excerpts()}") from None
        with self.engine.connect() as c:
            per_instance = c.execute(
                select(Instance.SOPInstanceUID, func.count(Prediction.id))
                .join(Prediction, Prediction.instance_id == Instance.id).group_by(Instance.SOPInstanceUID)
            ).all()
            assert c.execute(text("select count(*) from instance where state not in "
                                  "('PREDICTED', 'SKIPPED', 'FAILED')")).scalar_one() == 0
        counts = dict(per_instance)
        assert set(counts) >= succeeded
        assert all(n == 1 for n in counts.values()), counts

    def close(self) -> None:
        for proc in self.processes.values():
            proc.stop()
        self.engine.dispose()
        self.redis.stop()
        self.postgres.destroy()


@pytest.fixture
def topology(tmp_path):
    top = Topology(tmp_path)
    yield top
    top.close()


def _succeeded(statuses: dict[str, int]) -> set[str]:
    return {uid for uid, status in statuses.items() if status == 0}


def _wait_for_some_predicted(topology: Topology, n: int = 1) -> None:
    """Until the first results are in, while most are still in flight (else the fault hits nothing)."""
    wait_until(lambda: topology.counts().get("PREDICTED", 0) >= n, timeout=90, interval=0.1, what=f"{n} PREDICTED")
    assert topology.counts().get("PREDICTED", 0) < COUNT, "everything finished before the fault"


@pytest.mark.parametrize("victim", ["inference", "preprocess"])
def test_kill_9_of_a_worker_mid_flight_loses_nothing(topology, victim):
    statuses = topology.send()
    assert len(_succeeded(statuses)) == COUNT
    _wait_for_some_predicted(topology)
    topology.kill(victim)
    time.sleep(2)
    topology.start(victim)
    topology.assert_exactly_once(_succeeded(statuses))


@pytest.mark.parametrize("during", ["preprocessing", "inference"])
def test_redis_restart_with_studies_in_flight_loses_nothing(topology, during):
    statuses = topology.send()
    if during == "preprocessing":  # the preprocess worker is handing images on to the inference queue
        wait_until(lambda: topology.counts().get("PREPROCESSED", 0) >= 1, timeout=90, interval=0.01,
                   what="1 PREPROCESSED")
    else:
        _wait_for_some_predicted(topology)
    topology.redis.stop()  # no persistence: every queued message is gone
    time.sleep(3)
    topology.redis.start()
    topology.assert_exactly_once(_succeeded(statuses))


def test_postgresql_down_for_10_seconds_while_results_are_written_loses_nothing(topology):
    statuses = topology.send()
    _wait_for_some_predicted(topology)
    topology.postgres.stop()
    time.sleep(10)
    topology.postgres.start()
    topology.assert_exactly_once(_succeeded(statuses))


def test_kill_9_of_the_listener_mid_association_keeps_every_acknowledged_instance(topology):
    killed = threading.Event()

    def kill_after_five(successes: int) -> None:
        if successes == 5 and not killed.is_set():
            killed.set()
            topology.kill("listener")

    statuses = topology.send(on_success=kill_after_five)
    assert killed.is_set()
    succeeded = _succeeded(statuses)
    assert 5 <= len(succeeded) < COUNT
    topology.start("listener")
    wait_for_port(topology.port, topology.processes["listener"].proc)
    topology.assert_exactly_once(succeeded)
