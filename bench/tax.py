"""The pipeline's tax, in one run: what the product does around the model, measured side by side
on this machine, with the model's pure inference rate so ratios compare across machines.

1. `pneumoscreen run` (the embedded default): COUNT_RUN CR films of 2 MB over one association
   (bench/e2e.py --topology embedded);
2. the production topology (bench/e2e.py): COUNT_E2E films over 2 associations, listener with 2
   processes, preprocess and inference workers, Redis, PostgreSQL; its CPU per image summed over
   all processes, less the forward pass;
3. one inference worker draining COUNT_DRAIN queued images against the model alone (bench/drain.py);
4. receive over 1 and 4 associations against Orthanc and storescp (bench/receive.py).

    .venv/bin/python bench/tax.py [--run 300] [--e2e 500] [--drain 2000] [--receive 300] [--repeats 1]

Prints a Markdown table (the README's) and writes bench/results/tax.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import drain
import e2e


def e2e_args(topology: str, count: int, associations: int) -> argparse.Namespace:
    return argparse.Namespace(topology=topology, count=count, associations=associations, batch_size=32,
                              listener_processes=2, preprocess_concurrency=2, preprocess_pool="threads",
                              profile=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=int, default=300, help="films sent to `pneumoscreen run`")
    parser.add_argument("--e2e", type=int, default=500, help="films sent to the production topology")
    parser.add_argument("--drain", type=int, default=2000, help="images queued for one inference worker")
    parser.add_argument("--receive", type=int, default=300, help="films per receive measurement (0: skip)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of each receive measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tax.json")
    args = parser.parse_args()

    results: dict = {}
    print(f"embedded: `pneumoscreen run`, {args.run} films, 1 association ...", flush=True)
    results["embedded"] = e2e.measure(e2e_args("embedded", args.run, 1))
    print(f"production topology, {args.e2e} films, 2 associations ...", flush=True)
    results["production"] = e2e.measure(e2e_args("production", args.e2e, 2))
    print(f"one inference worker draining {args.drain} queued images ...", flush=True)
    results["drain"] = drain.measure(args.drain, 32)
    if args.receive:
        print(f"receive, {args.receive} films, 1 and 4 associations ...", flush=True)
        out = ROOT / "bench" / "results" / "receive-tax.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "receive.py"), "--count", str(args.receive),
                        "--repeats", str(args.repeats), "--out", str(out)], check=True, cwd=ROOT)
        results["receive"] = json.loads(out.read_text())["results"]
    for name in ("embedded", "production"):
        results[name].pop("timeline", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")


def table(results: dict) -> str:
    embedded, production, drained = results["embedded"], results["production"], results["drain"]
    rows = [
        ("`pneumoscreen run`, one association, send start to last PREDICTED",
         (f"{embedded['images_per_second']} img/s ({embedded['count']} films), "
          f"{embedded['images_per_second'] / production['images_per_second']:.2f}x the production topology")),
        ("production topology (`bench/e2e.py`)",
         (f"{production['images_per_second']} img/s ({production['count']} films; p95 "
          f"{production['latency_dispatch_to_result_seconds']['p95']} s)")),
        ("CPU per image summed over all processes, minus the forward pass",
         f"production {production['cpu_ms_per_image_around_the_model']} ms "
         f"({production['cpu_ms_per_image_total']} - {production['forward_pass_ms_per_image']}: "
         + ", ".join(f"{k} {v}" for k, v in production["cpu_ms_per_image"].items())
         + f"); embedded {embedded['cpu_ms_per_image_around_the_model']} ms"),
        (f"one inference worker draining {drained['count']} queued images vs the model alone",
         (f"{drained['ratio']}x ({drained['worker_images_per_second']} vs "
          f"{drained['pure_inference_images_per_second']} img/s; worker CPU {drained['worker_cpu_ms_per_image']} "
          f"ms/image, forward {drained['forward_pass_ms_per_image']})")),
    ]
    for key, label in (("1_association", "1"), ("4_associations", "4")):
        row = results.get("receive", {}).get(key)
        if row:
            shared = next((v for k, v in row.items() if k.startswith("pneumoscreen_") and isinstance(v, dict)), None)
            text = (f"pneumoscreen {row['pneumoscreen']['instances_per_second']:.0f} inst/s, Orthanc "
                    f"{row['orthanc']['instances_per_second']:.0f} ({row['ratio_to_orthanc']:.2f}x), storescp "
                    f"{row['storescp']['instances_per_second']:.0f}")
            if shared:
                text += f"; 2 listener processes {shared['instances_per_second']:.0f}"
            rows.append((f"receive, {label} association{'s' if label != '1' else ''}", text))
    rows.append(("pure inference (batch 32, this machine)",
                 (f"{production['pure_inference_images_per_second']} img/s, "
                  f"{production['forward_pass_ms_per_image']} ms/image")))
    return "| measure | figure |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


if __name__ == "__main__":
    main()
