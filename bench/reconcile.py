"""What the reconciler's queries cost on a busy day's database.

Every ``PNEUMOSCREEN_RECONCILE_AFTER_SECONDS`` the beat ``reconcile`` task looks for instances
stuck in a state, reports whose delivery went stale, and studies answered in the last 24 hours
whose report was never asked for (``db.deliveries.unreported_studies``). The last one scans the
day's PREDICTED instances. This bench fills a scratch PostgreSQL database with STUDIES studies
answered over the last day (two images each, a prediction each, the report SENT for all but
MISSING of them) and times the three queries (median of REPEAT runs), printing the figures and
the number each found.

    .venv/bin/python bench/reconcile.py --studies 50000 --missing 25
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, text  # noqa: E402

from db.deliveries import stale_deliveries, unreported_studies  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.models import DeliveryState, Instance, InstanceState, Prediction, ResultDelivery, Series, Study, utcnow  # noqa: E402
from db.queries import stale_instances  # noqa: E402
from db.session import make_engine, make_sessionmaker  # noqa: E402
from tests.helpers.services import scratch_database  # noqa: E402

DESTINATION = "PACS@127.0.0.1:104"
VERSION = "0.5.0"


def fill(sessions, studies: int, missing: int, chunk: int = 5000) -> None:
    now = utcnow()
    for start in range(0, studies, chunk):
        ids = range(start + 1, min(studies, start + chunk) + 1)
        at = {i: now - timedelta(seconds=(i * 86_000) // studies + 120) for i in ids}
        with sessions.begin() as s:
            s.execute(insert(Study), [{"id": i, "StudyInstanceUID": f"1.2.826.0.1.3680043.10.1.{i}",
                                       "received_at": at[i], "last_received_at": at[i]} for i in ids])
            s.execute(insert(Series), [{"id": i, "study_id": i, "SeriesInstanceUID": f"1.2.826.0.1.3680043.10.2.{i}",
                                        "Modality": "CR"} for i in ids])
            s.execute(insert(Instance), [
                {"id": 2 * i + j, "series_id": i, "SOPInstanceUID": f"1.2.826.0.1.3680043.10.3.{i}.{j}",
                 "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1", "TransferSyntaxUID": "1.2.840.10008.1.2.1",
                 "path": f"/spool/{i}.{j}.dcm", "size_bytes": 1_000_000, "state": InstanceState.PREDICTED,
                 "received_at": at[i], "updated_at": at[i]} for i in ids for j in (0, 1)])
            s.execute(insert(Prediction), [
                {"instance_id": 2 * i + j, "model_name": "pneumoscreen-cnn", "model_version": VERSION,
                 "weights_sha256": "a" * 64, "probability": 0.5, "threshold": 0.7, "flagged": False,
                 "created_at": at[i]} for i in ids for j in (0, 1)])
            s.execute(insert(ResultDelivery), [
                {"study_id": i, "model_version": VERSION, "destination": DESTINATION, "state": DeliveryState.SENT,
                 "attempts": 1, "instance_count": 2, "updated_at": at[i] + timedelta(seconds=5)}
                for i in ids if i % max(1, studies // max(1, missing)) != 0 or missing == 0])


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--studies", type=int, default=50_000)
    parser.add_argument("--missing", type=int, default=25, help="studies whose report was never asked for")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with scratch_database(args.admin_url, prefix="pneumoscreen_bench") as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        started = time.perf_counter()
        fill(sessions, args.studies, args.missing)
        with engine.connect() as c:  # as autovacuum would: without statistics the planner nests seq scans
            c.execute(text("ANALYZE"))
            c.commit()
        print(f"{args.studies:,} studies, {2 * args.studies:,} PREDICTED instances over the last day, "
              f"filled in {time.perf_counter() - started:.0f} s")
        now = utcnow()
        with sessions() as s:
            ms, found = timed(lambda: unreported_studies(s, destination=DESTINATION,
                                                          answered_since=now - timedelta(hours=24),
                                                          answered_before=now - timedelta(seconds=60)),
                              args.repeat)
            print(f"unreported_studies: {ms:.0f} ms (median of {args.repeat}), {len(found)} found")
            ms, stuck = timed(lambda: stale_instances(s, older_than=now - timedelta(seconds=60)), args.repeat)
            print(f"stale_instances:    {ms:.0f} ms, {len(stuck)} found")
            ms, stale = timed(lambda: stale_deliveries(s, older_than=now - timedelta(seconds=60)), args.repeat)
            print(f"stale_deliveries:   {ms:.0f} ms, {len(stale)} found")
        engine.dispose()


if __name__ == "__main__":
    main()
