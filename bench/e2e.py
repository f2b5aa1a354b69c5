"""End-to-end throughput of the production topology on this machine.

N (default 500) CR images of about 2 MB are sent with dcmtk's storescu
(TCP_NODELAY=1) to `pneumoscreen listen`, with one preprocess worker and one
inference worker as separate processes over Redis and PostgreSQL. Reports
images/s from the first byte sent until the last instance is PREDICTED,
p50/p95 latency from study dispatch to result, peak RSS per process, and, in
the same run, the pure inference rate of the same model at the same batch
size. Writes JSON.

    .venv/bin/python bench/e2e.py [--count 500] [--associations 2]

Uses Redis db 12 on PNEUMOSCREEN_BENCH_REDIS (default redis://127.0.0.1:6379/12, flushed)
and a scratch database on PNEUMOSCREEN_BENCH_POSTGRES (default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres; created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from sqlalchemy import create_engine, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from receive import ENV, free_port, make_images, scratch_postgres, send, wait_for_port  # noqa: E402

from db.models import Instance, InstanceState, Prediction  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process and its children (a Celery worker may fork)."""
    total = 0
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def pure_inference_rate(batch_size: int, seconds: float = 10.0) -> float:
    from model.artifact import get_model

    model = get_model()
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(batch_size, 224, 224), dtype=np.uint8)
    model.predict(batch)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(batch)
        done += batch_size
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    args = parser.parse_args()

    redis_url = os.environ.get("PNEUMOSCREEN_BENCH_REDIS", "redis://127.0.0.1:6379/12")
    redis.Redis.from_url(redis_url).flushdb()
    procs: dict[str, subprocess.Popen] = {}
    with scratch_postgres() as database_url, \
            tempfile.TemporaryDirectory(prefix="pneumoscreen-e2e-", dir=ROOT / "bench") as tmp:
        workdir = Path(tmp)
        try:
            (workdir / "images").mkdir()
            files = make_images(workdir / "images", args.count)
            port = free_port()
            env = {k: v for k, v in ENV.items() if not k.startswith("PNEUMOSCREEN_")}
            env.update({"PNEUMOSCREEN_DATABASE_URL": database_url, "PNEUMOSCREEN_BROKER_URL": redis_url,
                        "PNEUMOSCREEN_DATA_DIR": str(workdir / "data"), "PNEUMOSCREEN_PORT": str(port),
                        "PNEUMOSCREEN_STUDY_QUIET_SECONDS": "1", "PNEUMOSCREEN_LOG_LEVEL": "WARNING",
                        "PNEUMOSCREEN_MIN_FREE_MB": "64", "PNEUMOSCREEN_INFERENCE_BATCH_SIZE": str(args.batch_size)})
            cli = [sys.executable, "-m", "worker.cli"]
            subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=ROOT)
            commands = {"listener": ["listen"],
                        "preprocess": ["worker", "--queues", "preprocess,maintenance", "--concurrency", "2"],
                        "inference": ["worker", "--queues", "inference"]}
            for name, command in commands.items():
                procs[name] = subprocess.Popen([*cli, *command], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                               stderr=open(workdir / f"{name}.log", "wb"))
            wait_for_port(port)
            time.sleep(8)  # the inference worker loads TensorFlow and the model

            engine = create_engine(database_url)
            started = time.perf_counter()
            send_seconds = send(port, "PNEUMOSCREEN", files, args.associations)
            while True:
                with engine.connect() as c:
                    done = c.execute(select(Instance.id).where(Instance.state.in_(
                        [InstanceState.PREDICTED, InstanceState.SKIPPED, InstanceState.FAILED]))).all()
                if len(done) >= len(files):
                    break
                if time.perf_counter() - started > 1800:
                    raise TimeoutError(f"only {len(done)} of {len(files)} done after 30 minutes")
                time.sleep(0.2)
            total_seconds = time.perf_counter() - started
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
            redis.Redis.from_url(redis_url).flushdb()

    states = {s.value: sum(1 for r in rows if r.state == s) for s in InstanceState}
    latencies = sorted((r[2] - r[1]).total_seconds() for r in rows if r[1] is not None and r[2] is not None)
    pure = pure_inference_rate(args.batch_size)
    rate = len(files) / total_seconds
    report = {
        "count": len(files), "associations": args.associations, "batch_size": args.batch_size,
        "send_seconds": round(send_seconds, 2), "total_seconds": round(total_seconds, 2),
        "images_per_second": round(rate, 1), "states": states,
        "latency_dispatch_to_result_seconds": {
            "p50": round(statistics.median(latencies), 3),
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 3), "max": round(latencies[-1], 3)},
        "peak_rss_mb": rss, "pure_inference_images_per_second": round(pure, 1),
        "fraction_of_pure_inference": round(rate / pure, 3),
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
