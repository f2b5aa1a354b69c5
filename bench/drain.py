"""How close one inference worker comes to the model alone: N (default 2,000) prepared images
are queued in Redis exactly as preprocess workers queue them (`pneumoscreen.infer` messages of
up to 8 images, instance rows PREPROCESSED in a scratch PostgreSQL database), then one `pneumoscreen
worker --queues inference` drains them. Reports images/s from its first stored answer to its
last, and, in the same run on the same CPUs, the pure inference rate of the same model at the
same batch size; the ratio is the worker's share of the model's speed. Writes JSON.

    .venv/bin/python bench/drain.py [--count 2000] [--batch-size 32]

Uses Redis db 12 on PNEUMOSCREEN_BENCH_REDIS (default redis://127.0.0.1:6379/12, flushed)
and a scratch database on PNEUMOSCREEN_BENCH_POSTGRES.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import cpu_seconds, pure_inference, start_profilers, top_functions
from inference import fixture_images
from receive import ENV, scratch_postgres


def queue_prepared(database_url: str, redis_url: str, count: int) -> None:
    """``count`` PREPROCESSED instances and their infer messages, as the preprocess worker leaves them."""
    from db.migrate import upgrade
    from db.models import InstanceState
    from db.queries import record_received, set_state
    from db.session import make_engine, make_sessionmaker
    from model.artifact import read_card
    from worker import pipeline
    from worker.prepared import RedisPreparedStore
    from worker.celery_app import configure_app, in_messages, sent_now
    from worker.settings import Settings
    from worker.tasks import infer

    upgrade(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    configure_app(Settings(broker_url=redis_url, database_url=database_url))
    images = fixture_images(16, size=read_card().input_size)  # prepared films (their PNG payloads are the size of real ones)
    with sessions.begin() as session:
        ids = []
        for i in range(count):
            instance_id, _ = record_received(
                session, StudyInstanceUID=f"1.2.826.0.1.3680043.10.1.{i // 4}",
                SeriesInstanceUID=f"1.2.826.0.1.3680043.10.2.{i // 4}", SOPInstanceUID=f"1.2.826.0.1.3680043.10.3.{i}",
                SOPClassUID="1.2.840.10008.5.1.4.1.1.1", TransferSyntaxUID="1.2.840.10008.1.2.1",
                AccessionNumber=f"D{i // 4}", Modality="CR", path=f"/nowhere/{i}.dcm", size_bytes=1,
                calling_ae="BENCH")
            ids.append(instance_id)
        for instance_id in ids:
            set_state(session, instance_id=instance_id, state=InstanceState.PREPROCESSED)
    card = read_card()
    settings = Settings(broker_url=redis_url, database_url=database_url)
    store = RedisPreparedStore.from_url(redis_url, settings.prepared_ttl_seconds) if settings.prepared_in_redis else None
    for chunk in in_messages(ids):
        prepared = [(i, images[i % len(images)]) for i in chunk]
        kwargs = {"preprocessing": card.preprocessing_version}
        if store is not None:  # as the preprocess workers leave them: in Redis, the message naming them
            store.put(prepared, version=card.preprocessing_version)
            infer.apply_async(args=[chunk, None], kwargs={**kwargs, "stored": card.input_size}, headers=sent_now())
        else:
            infer.apply_async(args=[chunk, [pipeline.encode_prepared(image) for _, image in prepared]],
                              kwargs=kwargs, headers=sent_now())
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "drain.json")
    parser.add_argument("--profile", type=Path, help="sample the worker with py-spy; raw stacks go here")
    args = parser.parse_args()
    print(json.dumps(measure(args.count, args.batch_size, args.out, profile=args.profile), indent=2))


def measure(count: int, batch_size: int, out: Path | None = None, *, profile: Path | None = None) -> dict:
    from db.models import Instance, InstanceState, Prediction
    from db.session import make_engine

    redis_url = os.environ.get("PNEUMOSCREEN_BENCH_REDIS", "redis://127.0.0.1:6379/12")
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    with scratch_postgres() as database_url, tempfile.TemporaryDirectory(prefix="pneumoscreen-drain-",
                                                                         dir=ROOT / "bench") as tmp:
        queue_prepared(database_url, redis_url, count)
        queued = broker.llen("inference")
        env = {k: v for k, v in ENV.items() if not k.startswith("PNEUMOSCREEN_")}
        env.update({"PNEUMOSCREEN_DATABASE_URL": database_url, "PNEUMOSCREEN_BROKER_URL": redis_url,
                    "PNEUMOSCREEN_DATA_DIR": tmp, "PNEUMOSCREEN_LOG_LEVEL": "WARNING",
                    "PNEUMOSCREEN_INFERENCE_BATCH_SIZE": str(batch_size)})
        with open(Path(tmp) / "inference.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--queues", "inference"],
                                      env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
            engine = make_engine(database_url)
            profilers: dict = {}
            try:
                cpu_at_first = None
                deadline = time.monotonic() + 1800
                while time.monotonic() < deadline:
                    with engine.connect() as c:
                        done = c.scalar(select(func.count()).where(Instance.state == InstanceState.PREDICTED))
                    if done and cpu_at_first is None:
                        cpu_at_first = (cpu_seconds(worker.pid), done)
                        if profile:  # from the first answer: the worker's start-up is not the question
                            profilers = start_profilers({"inference": worker}, profile)
                    if done >= count:
                        break
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited: {(Path(tmp) / 'inference.log').read_text()[-2000:]}")
                    time.sleep(0.05)
                cpu_ms = 1000 * (cpu_seconds(worker.pid) - cpu_at_first[0]) / (count - cpu_at_first[1])
                for profiler in profilers.values():
                    profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    profiler.wait(timeout=60)
                with engine.connect() as c:
                    first, last = c.execute(select(func.min(Prediction.created_at),
                                                   func.max(Prediction.created_at))).one()
                    batches = c.scalar(select(func.count(func.distinct(Prediction.created_at))))
            finally:
                worker.terminate()
                worker.wait(timeout=30)
                engine.dispose()
                broker.flushdb()
    rate = (count - 1) / (last - first).total_seconds()
    pure, forward_cpu_ms = pure_inference(batch_size)
    report = {"count": count, "queued": queued, "batch_size": batch_size, "worker_images_per_second": round(rate, 1),
              "pure_inference_images_per_second": round(pure, 1), "ratio": round(rate / pure, 3),
              "worker_cpu_ms_per_image": round(cpu_ms, 1), "forward_pass_ms_per_image": round(1000 / pure, 1),
              "forward_pass_cpu_ms_per_image": round(forward_cpu_ms, 1),
              "distinct_commit_times": batches}
    if profile:
        report["profile"] = top_functions(profile / "inference.txt", n=15)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
