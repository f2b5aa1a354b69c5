"""The production topology as separate processes, for the fault tests and the chaos soak:
listener, preprocess worker, inference worker and beat over a private Redis and a private
PostgreSQL that the caller may kill and restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import ClassVar

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from db.models import Instance, Prediction
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG, chest_dataset
from tests.helpers.processes import Process, cli_env, free_port, run_cli, wait_for_port, wait_until
from tests.helpers.services import PrivatePostgres, PrivateRedis

#: the settings of the fault tests: studies dispatched after 1 s, work in flight 4 s re-sent every second
FAULT_SETTINGS = {"study_quiet_seconds": 1, "reconcile_after_seconds": 4, "reconcile_interval_seconds": 1,
                  "inference_batch_size": 8}


class Topology:
    """Each kind of process started as a supervisor would start it; ``settings`` are PNEUMOSCREEN_*
    values (lower case, without the prefix) on top of the private Redis, PostgreSQL and data dir."""

    KINDS: ClassVar[dict[str, list[str]]] = {"listener": ["listen"], "preprocess": ["worker", "--queues", "preprocess,maintenance"],
                                             "inference": ["worker", "--queues", "inference"], "beat": ["beat"]}

    def __init__(self, tmp_path: Path, **settings) -> None:
        self.tmp_path = tmp_path
        self.redis = PrivateRedis(tmp_path)
        self.postgres = PrivatePostgres()
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.env = cli_env(database_url=self.postgres.url, broker_url=self.redis.url, data_dir=self.data_dir,
                           port=self.port, **{**FAULT_SETTINGS, **settings})
        run_cli("db", "upgrade", env=self.env)
        self.processes: dict[str, Process] = {}
        self.engine = create_engine(self.postgres.url, pool_pre_ping=True)
        for name in self.KINDS:
            self.start(name)
        wait_for_port(self.port, self.processes["listener"].proc)

    def start(self, name: str) -> None:
        n = sum(1 for _ in self.tmp_path.glob(f"{name}*.log"))
        self.processes[name] = Process(self.KINDS[name], self.env, self.tmp_path / f"{name}{n}.log")

    def kill(self, name: str) -> None:
        """SIGKILL, as the kernel's OOM killer or a power cut would stop it."""
        proc = self.processes.pop(name)
        proc.proc.kill()
        proc.proc.wait(timeout=10)
        proc.stop()

    def receiver_pids(self) -> list[int]:
        """The listener's extra processes (PNEUMOSCREEN_LISTENER_PROCESSES > 1)."""
        listener = self.processes.get("listener")
        if listener is None or listener.proc.poll() is not None:
            return []
        pid = listener.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in children if b"--receiver" in _cmdline(int(c))]

    def kill_receiver(self, timeout: float = 30.0) -> int:
        """SIGKILL one of the listener's extra processes (the listener starts it again); its pid."""
        pid = wait_until(lambda: next(iter(self.receiver_pids()), None), timeout=timeout, interval=0.2,
                         what="a listener receiver process")
        os.kill(pid, signal.SIGKILL)
        return pid

    def send(self, count: int, *, on_success=None) -> dict[str, int]:
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

    def assert_exactly_once(self, succeeded: set[str], timeout: float = 180) -> None:
        def done():
            try:
                with self.engine.connect() as c:
                    failed = set(c.scalars(select(Instance.SOPInstanceUID).where(Instance.state == "FAILED")))
                    predicted = set(c.scalars(select(Instance.SOPInstanceUID).where(Instance.state == "PREDICTED")))
            except SQLAlchemyError:  # the database may be restarting
                return False
            assert not failed & succeeded, f"acknowledged instances FAILED: {self.reasons()}"
            return succeeded <= predicted

        try:
            wait_until(done, timeout=timeout, interval=1, what=f"{len(succeeded)} instances PREDICTED")
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


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


