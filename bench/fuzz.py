"""The fuzzers' long runs, one command each; figures printed and written under bench/results/.

    .venv/bin/python bench/fuzz.py network [--count 1200] [--seconds 600] [--seed 19]
    .venv/bin/python bench/fuzz.py datasets [--count 3000] [--seed 7]

- ``network`` (tests/helpers/network_fuzz.py): starts `pneumoscreen listen` (SQLite in a scratch
  data dir, ARTIM 2 s) and runs COUNT hostile connections from 4 threads, every case in turn,
  while a well-behaved sender stores films and a prober sends C-ECHO every half second. Reports
  cases tried, the listener alive, films stored and recorded, rejections and aborts retried, echo
  failures and the slowest echo, the listener's resident memory (start, peak, end), files left in incoming/,
  tracebacks logged.
- ``datasets`` (tests/helpers/dataset_fuzz.py): COUNT mutants of real files of many transfer
  syntaxes through the path of every received file (spool and row) and the pipeline (eligibility,
  decoding, preprocessing, the shipped model), in this process. Reports files tried by mutation,
  how they ended, crashes, instances left in flight or ended without a reason, the slowest
  decoding, peak memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def network(args) -> dict:
    from sqlalchemy import create_engine, select

    from db.models import Instance
    from tests.helpers.network_fuzz import NetworkFuzzer
    from tests.helpers.processes import listening

    with tempfile.TemporaryDirectory(prefix="pneumoscreen-fuzz-") as tmp:
        with listening(Path(tmp), args.broker_url, artim_timeout=2) as (port, listener, data_dir):
            report = NetworkFuzzer(port, listener.proc.pid, seed=args.seed).run(count=args.count,
                                                                               seconds=args.seconds)
            alive = listener.proc.poll() is None
        engine = create_engine(f"sqlite:///{data_dir / 'pneumoscreen.db'}")
        with engine.connect() as c:
            recorded = set(c.scalars(select(Instance.SOPInstanceUID)))
        engine.dispose()
        return {**report.as_dict(), "listener_alive": alive,
                "stored_but_not_recorded": len(set(report.stored) - recorded),
                "left_in_incoming": len(list((data_dir / "incoming").iterdir())),
                "tracebacks_logged": listener.log().count("Traceback")}


def datasets(args) -> dict:
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from tests.helpers.dataset_fuzz import run_dataset_fuzz

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # a warning for every invalid value: the point here
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="pneumoscreen-fuzz-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'fuzz.db'}"
        upgrade(url)
        engine = make_engine(url)
        report = run_dataset_fuzz(Path(tmp), make_sessionmaker(engine), count=args.count, seed=args.seed)
        engine.dispose()
    return {**report.as_dict(), "crash_examples": report.crashes[:10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="fuzzer", required=True)
    net = sub.add_parser("network", help="hostile connections against a running listener")
    net.add_argument("--count", type=int, default=1200)
    net.add_argument("--seconds", type=float, default=600)
    net.add_argument("--seed", type=int, default=19)
    net.add_argument("--broker-url", default="redis://127.0.0.1:6379/12", help="only read at start-up")
    data = sub.add_parser("datasets", help="mutated files through store and pipeline")
    data.add_argument("--count", type=int, default=3000)
    data.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = network(args) if args.fuzzer == "network" else datasets(args)
    out = ROOT / "bench" / "results" / f"fuzz_{args.fuzzer}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
