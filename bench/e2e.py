"""End-to-end throughput of the production topology on this machine.

N (default 500) CR images of about 2 MB are sent with dcmtk's storescu
(TCP_NODELAY=1) to `pneumoscreen listen`, with one preprocess worker and one
inference worker as separate processes over Redis and PostgreSQL. Reports
images/s from the first byte sent until the last instance is PREDICTED,
p50/p95 latency from study dispatch to result, peak RSS per process, and, in
the same run, the pure inference rate of the same model at the same batch
size. Writes JSON.

    .venv/bin/python bench/e2e.py [--count 500] [--associations 2] [--listener-processes 2] [--profile DIR]
    .venv/bin/python bench/e2e.py --topology embedded [--count 300] [--associations 1]

``--topology embedded`` measures `pneumoscreen run` instead: the one process that a new user
starts (listener, workers, beat, in-process broker, SQLite in its data dir).

The listener runs as in the compose file, with 2 processes sharing the port
(PNEUMOSCREEN_LISTENER_PROCESSES); ``--listener-processes 1`` gives the default of
a single process.

The report also gives each process's CPU milliseconds per image (from
/proc); with ``--profile DIR`` (needs py-spy) each process is sampled while
it works and the hottest functions are printed, with raw stacks in DIR.

Uses Redis db 12 on PNEUMOSCREEN_BENCH_REDIS (default redis://127.0.0.1:6379/12, flushed)
and a scratch database on PNEUMOSCREEN_BENCH_POSTGRES (default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres; created and dropped).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
from sqlalchemy import create_engine, func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from receive import ENV, free_port, listening_sockets, make_images, scratch_postgres, send, wait_for_port

from db.models import Instance, InstanceState, Prediction


def peak_rss_mb(pid: int) -> float:
    """The largest VmHWM among the process and its children (listener receivers, forked workers)."""
    peak = 0
    for p in _family(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


def _family(pid: int) -> list[int]:
    return [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its children so far."""
    return sum(cpu_by_role(pid, "").values())


def cpu_by_role(pid: int, name: str) -> dict[str, float]:
    """CPU seconds so far of the process ``name`` and its children, by role: a listener's receiver
    processes (``listen --receiver``, the listener of `pneumoscreen run` too) as ``listener``, the
    rest under ``name``."""
    ticks = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = collections.defaultdict(float)
    for p in _family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            receiver = b"--receiver" in Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:  # gone since it was listed
            continue
        roles["listener" if receiver and name else name] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(roles)


#: Where a sample of a process's stack is spent, first match wins: (stage, substrings of the stack).
STAGES = (
    ("forward pass", ("tensorflow", "keras")),
    ("listener: our handler (spool, fsync, row, events)", ("handle_store (dicom_io",)),
    ("listener: pynetdicom (PDUs, temp file, reactor loops)", ("pynetdicom", "dicom_io/wire.py")),
    ("decode (pixel data, LUTs)", ("display_image (dicom_io",)),
    ("prepare (crop, resize, equalize)", ("prepare (model/preprocessing",)),
    ("read the file and judge it", ("dcmread (pydicom", "judge (dicom_io")),
    ("database", ("sqlalchemy", "psycopg", "sqlite3")),
    ("broker and task machinery (Celery, kombu, Redis)", ("kombu", "celery", "redis", "billiard")),
    ("dispatcher", ("dispatcher.py",)),
)


def stage_samples(raw: Path) -> dict[str, dict[str, int]]:
    """From py-spy's raw stacks of one process and its children: per role (``listener`` for a
    receiver process, ``main`` otherwise), the samples in each of :data:`STAGES` (``other``: none
    of them)."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        processes = [frame for frame in stack.split(";")[:3] if frame.startswith("process ")]
        role = "listener" if any("--receiver" in frame for frame in processes) else "main"
        stage = next((name for name, marks in STAGES if any(m in stack for m in marks)), "other")
        counts[role][stage] += int(samples)
    return {role: dict(c.most_common()) for role, c in counts.items()}


def start_profilers(procs: dict[str, subprocess.Popen], out: Path) -> dict[str, subprocess.Popen]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    return {name: subprocess.Popen([py_spy, "record", "--pid", str(p.pid), "--format", "raw", "--rate", "200",
                                    "--subprocesses", "--nonblocking", "--output", str(out / f"{name}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, p in procs.items()}


def top_functions(raw: Path, n: int = 10) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's raw stacks: the functions where the samples were taken (``self``) and, among
    pneumoscreen's own functions, those most often on the stack (``ours``), as shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[1:]]  # per function, not line
        if not frames:
            continue
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            if frame.split(" (")[-1].startswith(("worker/", "dicom_io/", "model/", "db/")):
                ours[frame] += int(samples)
    if not total:
        return {}
    return {name: [(frame, round(c / total, 3)) for frame, c in counter.most_common(n)]
            for name, counter in (("self", own), ("ours", ours))}


class QueueSampler(threading.Thread):
    """Every 0.25 s: the broker's preprocess and inference queue lengths and the instances per state,
    to see where images wait."""

    def __init__(self, redis_url: str | None, engine) -> None:
        super().__init__(daemon=True)
        self.redis = redis.Redis.from_url(redis_url) if redis_url else None
        self.engine = engine
        self.started = time.perf_counter()
        self.timeline: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.25):
            with self.engine.connect() as c:
                states = dict(c.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
            queues = {"preprocess_queue": self.redis.llen("preprocess"),
                      "inference_queue": self.redis.llen("inference")} if self.redis else {}
            self.timeline.append({"t": round(time.perf_counter() - self.started, 2), **queues,
                                  **{state.value: n for state, n in states.items()}})

    def stop(self) -> list[dict]:
        self._stop_event.set()
        self.join()
        return self.timeline


def pure_inference_rate(batch_size: int, seconds: float = 10.0) -> float:
    """The model alone: images per second at ``batch_size``, in this process."""
    return pure_inference(batch_size, seconds)[0]


def pure_inference(batch_size: int, seconds: float = 10.0) -> tuple[float, float]:
    """The model alone at ``batch_size``, in this process: (images per second, CPU ms per image).
    TensorFlow computes on every core, so the CPU per image is more than the wall time per image."""
    from model.artifact import get_model

    model = get_model()
    rng = np.random.default_rng(0)
    side = model.card.input_size
    batch = rng.integers(0, 256, size=(batch_size, side, side), dtype=np.uint8)
    model.predict(batch)  # warm-up
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        model.predict(batch)
        done += batch_size
    return done / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", choices=["production", "embedded"], default="production")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--listener-processes", type=int, default=2)
    parser.add_argument("--preprocess-concurrency", type=int, default=2)
    parser.add_argument("--preprocess-pool", choices=["threads", "prefork"], default="threads")
    parser.add_argument("--out", type=Path, help="JSON report [bench/results/e2e.json or e2e-embedded.json]")
    parser.add_argument("--profile", type=Path, help="sample every process with py-spy; raw stacks go here")
    args = parser.parse_args()
    report = measure(args)
    print(json.dumps({key: value for key, value in report.items() if key != "timeline"}, indent=2))
    out = args.out or ROOT / "bench" / "results" / ("e2e.json" if args.topology == "production" else
                                                     "e2e-embedded.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def measure(args) -> dict:
    """One run of the topology that ``args`` names; the report."""
    embedded = args.topology == "embedded"
    redis_url = os.environ.get("PNEUMOSCREEN_BENCH_REDIS", "redis://127.0.0.1:6379/12")
    if not embedded:
        redis.Redis.from_url(redis_url).flushdb()
    procs: dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pneumoscreen-e2e-", dir=ROOT / "bench")))
        if embedded:
            database_url = f"sqlite:///{workdir / 'data' / 'pneumoscreen.db'}"
        else:
            database_url = stack.enter_context(scratch_postgres())
        try:
            (workdir / "images").mkdir()
            files = make_images(workdir / "images", args.count)
            port = free_port()
            env = {k: v for k, v in ENV.items() if not k.startswith("PNEUMOSCREEN_")}
            env.update({"PNEUMOSCREEN_DATA_DIR": str(workdir / "data"), "PNEUMOSCREEN_PORT": str(port),
                        "PNEUMOSCREEN_STUDY_QUIET_SECONDS": "1", "PNEUMOSCREEN_LOG_LEVEL": "WARNING",
                        "PNEUMOSCREEN_MIN_FREE_MB": "64", "PNEUMOSCREEN_INFERENCE_BATCH_SIZE": str(args.batch_size)})
            if not embedded:
                env.update({"PNEUMOSCREEN_DATABASE_URL": database_url, "PNEUMOSCREEN_BROKER_URL": redis_url,
                            "PNEUMOSCREEN_LISTENER_PROCESSES": str(args.listener_processes)})
            cli = [sys.executable, "-m", "worker.cli"]
            subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=ROOT)
            if embedded:
                commands = {"run": ["run"]}
            else:
                commands = {"listener": ["listen"],
                            "preprocess": ["worker", "--queues", "preprocess,maintenance", "--pool",
                                           args.preprocess_pool, "--concurrency", str(args.preprocess_concurrency)],
                            "inference": ["worker", "--queues", "inference"]}
            for name, command in commands.items():
                procs[name] = subprocess.Popen([*cli, *command], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                               stderr=open(workdir / f"{name}.log", "wb"))
            wait_for_port(port)
            processes = 1 if embedded else args.listener_processes
            deadline = time.monotonic() + 60
            while listening_sockets(port) < processes:
                if time.monotonic() > deadline:
                    raise TimeoutError("the listener processes did not all start")
                time.sleep(0.2)
            time.sleep(8)  # the inference worker loads TensorFlow and the model

            engine = create_engine(database_url)
            cpu_before = {name: cpu_by_role(p.pid, name) for name, p in procs.items()}
            profilers = start_profilers(procs, args.profile) if args.profile else {}
            sampler = QueueSampler(None if embedded else redis_url, engine)
            sampler.start()
            started = time.perf_counter()
            send_seconds = send(port, "PNEUMOSCREEN", files, args.associations)
            while True:
                with engine.connect() as c:
                    done = c.execute(select(func.count()).where(Instance.state.in_(
                        [InstanceState.PREDICTED, InstanceState.SKIPPED, InstanceState.FAILED]))).scalar_one()
                if done >= len(files):
                    break
                if time.perf_counter() - started > 1800:
                    raise TimeoutError(f"only {done} of {len(files)} done after 30 minutes")
                time.sleep(0.1)
            total_seconds = time.perf_counter() - started
            timeline = sampler.stop()
            cpu_ms = {role: round(1000 * (seconds - cpu_before[name].get(role, 0.0)) / len(files), 1)
                      for name, p in procs.items() for role, seconds in cpu_by_role(p.pid, name).items()}
            for profiler in profilers.values():
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            for profiler in profilers.values():
                profiler.wait(timeout=60)
            rss = {name: round(peak_rss_mb(p.pid), 1) for name, p in procs.items()}
            with engine.connect() as c:
                rows = c.execute(select(Instance.state, Instance.queued_at, Prediction.created_at)
                                 .outerjoin(Prediction, Prediction.instance_id == Instance.id)).all()
            engine.dispose()
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            if not embedded:
                redis.Redis.from_url(redis_url).flushdb()

    states = {s.value: sum(1 for r in rows if r.state == s) for s in InstanceState}
    latencies = sorted((r[2] - r[1]).total_seconds() for r in rows if r[1] is not None and r[2] is not None)
    pure, forward_cpu_ms = pure_inference(args.batch_size)
    rate = len(files) / total_seconds
    forward_ms = 1000 / pure
    report = {
        "topology": args.topology, "count": len(files), "associations": args.associations,
        "listener_processes": 1 if embedded else args.listener_processes,
        "preprocess": None if embedded else f"{args.preprocess_pool} x {args.preprocess_concurrency}",
        "batch_size": args.batch_size,
        "send_seconds": round(send_seconds, 2), "total_seconds": round(total_seconds, 2),
        "images_per_second": round(rate, 1), "states": states,
        "latency_dispatch_to_result_seconds": {
            "p50": round(statistics.median(latencies), 3),
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 3), "max": round(latencies[-1], 3)},
        "peak_rss_mb": rss, "cpu_ms_per_image": cpu_ms,
        "cpu_ms_per_image_total": round(sum(cpu_ms.values()), 1),
        "forward_pass_ms_per_image": round(forward_ms, 1),
        "forward_pass_cpu_ms_per_image": round(forward_cpu_ms, 1),
        "cpu_ms_per_image_around_the_model": round(sum(cpu_ms.values()) - forward_cpu_ms, 1),
        "pure_inference_images_per_second": round(pure, 1),
        "fraction_of_pure_inference": round(rate / pure, 3),
        "max_waiting": {key: max((point.get(key, 0) for point in timeline), default=0)
                        for key in ("RECEIVED", "preprocess_queue", "inference_queue")},
        "timeline": timeline,
    }
    if args.profile:
        report["profile"] = {name: top_functions(args.profile / f"{name}.txt") for name in procs}
        report["stages"] = {name: stage_samples(args.profile / f"{name}.txt") for name in procs}
    return report


if __name__ == "__main__":
    main()
