"""The chaos soak's long run (tests/helpers/soak.py), one command; figures printed and written
to bench/results/soak.json.

    .venv/bin/python bench/soak.py [--count 10000] [--seed 19] [--kills-per-kind 3]

The production topology (listener with 2 processes, preprocess worker, inference worker, beat;
private Redis and PostgreSQL servers, started here) receives COUNT instances over 4 associations
while each process kind is killed with SIGKILL KILLS_PER_KIND times, Redis is restarted twice and
PostgreSQL once, on a schedule fixed by the seed. Needs redis-server and the PostgreSQL server
binaries; runs as root (the private PostgreSQL runs as the postgres user). About 10 GB of spool
for 10,000 instances, in a temporary folder under bench/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--kills-per-kind", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (the logs of every process)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()

    from tests.helpers.soak import Soak

    started = time.monotonic()

    def progress(acknowledged: int, predicted: int) -> None:
        print(f"\r{time.monotonic() - started:7.0f} s  acknowledged {acknowledged:6d}/{args.count}  "
              f"predicted {predicted:6d}", end="", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="pneumoscreen-soak-", dir=ROOT / "bench") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        soak = Soak(workdir, count=args.count, seed=args.seed, kills_per_kind=args.kills_per_kind)
        report = soak.run(progress=progress)
    print(file=sys.stderr)
    result = {**report.as_dict(), "sound": report.sound, "wall_seconds": round(time.monotonic() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "faults"}, indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if report.sound else 1)


if __name__ == "__main__":
    main()
