"""What the reconciler's queries cost on a busy day's database.

Every ``PNEUMOSCREEN_RECONCILE_AFTER_SECONDS`` the beat ``reconcile`` task looks for instances
stuck in a state, reports whose delivery went stale, and studies answered in the last 24 hours
whose report was never asked for (``db.deliveries.unreported_studies``). The last one scans the
day's PREDICTED instances. This bench fills a scratch PostgreSQL database with STUDIES studies
answered over the last day (two images each, a prediction each, the report SENT for all but
MISSING of them) and times the three queries (median of REPEAT runs), printing the figures and
the number each found. ``--statistics`` says what the planner knows of the filled tables: all
(``full``, ANALYZE, as autovacuum leaves them), row counts only (``sizes``, VACUUM) or nothing
(``none``); ``--explain`` prints the plan of the unreported-report query.

    .venv/bin/python bench/reconcile.py --studies 50000 --missing 25 [--statistics sizes] [--explain]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text  # noqa: E402

from db.deliveries import stale_deliveries, unreported_studies, unreported_studies_statement  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.models import utcnow  # noqa: E402
from db.queries import stale_instances  # noqa: E402
from db.session import make_engine, make_sessionmaker  # noqa: E402
from tests.helpers.records import fill_answered_day  # noqa: E402
from tests.helpers.services import scratch_database  # noqa: E402

DESTINATION = "PACS@127.0.0.1:104"
VERSION = "0.5.0"
TABLES = ("study", "series", "instance", "prediction", "result_delivery")


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
    parser.add_argument("--statistics", choices=("full", "sizes", "none"), default="full",
                        help="what the planner knows of the filled tables: full (ANALYZE, as autovacuum does "
                             "a minute later), sizes (VACUUM: row counts, no column statistics), none")
    parser.add_argument("--explain", action="store_true", help="print the plan of the unreported-report query")
    args = parser.parse_args()
    with scratch_database(args.admin_url, prefix="pneumoscreen_bench") as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        if args.statistics != "full":
            with engine.connect() as c:
                for table in TABLES:
                    c.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
                c.commit()
        started = time.perf_counter()
        fill_answered_day(sessions, studies=args.studies, missing=args.missing,
                          destination=DESTINATION, version=VERSION)
        if args.statistics != "none":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                for table in TABLES:
                    c.execute(text(f"{'ANALYZE' if args.statistics == 'full' else 'VACUUM'} {table}"))
        print(f"{args.studies:,} studies, {2 * args.studies:,} PREDICTED instances over the last day, "
              f"filled in {time.perf_counter() - started:.0f} s")
        now = utcnow()
        since, before = now - timedelta(hours=24), now - timedelta(seconds=60)
        with sessions() as s:
            if args.explain:
                statement = unreported_studies_statement(destination=DESTINATION, answered_since=since,
                                                         answered_before=before)
                compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
                for (line,) in s.execute(text(f"EXPLAIN {compiled}")):
                    print(line)
            ms, found = timed(lambda: unreported_studies(s, destination=DESTINATION,
                                                          answered_since=since, answered_before=before),
                              args.repeat)
            print(f"unreported_studies: {ms:.0f} ms (median of {args.repeat}), {len(found)} found")
            ms, stuck = timed(lambda: stale_instances(s, older_than=now - timedelta(seconds=60)), args.repeat)
            print(f"stale_instances:    {ms:.0f} ms, {len(stuck)} found")
            ms, stale = timed(lambda: stale_deliveries(s, older_than=now - timedelta(seconds=60)), args.repeat)
            print(f"stale_deliveries:   {ms:.0f} ms, {len(stale)} found")
        engine.dispose()


if __name__ == "__main__":
    main()
