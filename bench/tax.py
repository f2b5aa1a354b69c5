"""The pipeline's tax, in one run: what the product does around the model, measured side by side
on this machine, every figure as a ratio to the model alone (the pure inference rate at batch 32,
measured in the same run), so that figures compare across machines.

1. `pneumoscreen run` (the embedded default): COUNT_RUN CR films of 2 MB over one association
   (bench/e2e.py --topology embedded);
2. the production topology (bench/e2e.py): COUNT_E2E films over 2 associations, listener with 2
   processes, preprocess and inference workers, Redis, PostgreSQL;
3. one inference worker draining COUNT_DRAIN queued images against the model alone (bench/drain.py);
4. receive over 1 and 4 associations against Orthanc, storescp and pynetdicom alone (bench/receive.py).

With ``--profile`` (needs py-spy: ``pip install py-spy``), runs 1 and 2 are each made a second time
under py-spy, and a second table says where each millisecond of CPU per image goes, per process:
each process's CPU per image from the run that was not sampled (py-spy itself takes a core's
worth of CPU on 2 cores), split by the share of the sampled run's stacks in each stage
(``bench/e2e.py``'s ``STAGES``).

    .venv/bin/python bench/tax.py [--run 300] [--e2e 500] [--drain 2000] [--receive 300] [--repeats 1] [--profile]

Prints the two Markdown tables (the benchmarks page's) and writes bench/results/tax.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import drain
import e2e


def e2e_args(topology: str, count: int, associations: int, profile: Path | None) -> argparse.Namespace:
    return argparse.Namespace(topology=topology, count=count, associations=associations, batch_size=32,
                              listener_processes=2, preprocess_concurrency=2, preprocess_pool="threads",
                              profile=profile)


def py_spy() -> bool:
    return bool(shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=int, default=300, help="films sent to `pneumoscreen run`")
    parser.add_argument("--e2e", type=int, default=500, help="films sent to the production topology")
    parser.add_argument("--drain", type=int, default=2000, help="images queued for one inference worker")
    parser.add_argument("--receive", type=int, default=300, help="films per receive measurement (0: skip)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of each receive measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tax.json")
    parser.add_argument("--profile", action="store_true", help="also sample runs 1 and 2 with py-spy: the second table")
    args = parser.parse_args()

    results: dict = {}
    if args.profile and not py_spy():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    profiles = Path(tempfile.mkdtemp(prefix="pneumoscreen-tax-")) if args.profile else None
    for name, topology, count, associations in (("embedded", "embedded", args.run, 1),
                                                ("production", "production", args.e2e, 2)):
        print(f"{name}: {count} films, {associations} association(s) ...", flush=True)
        results[name] = e2e.measure(e2e_args(topology, count, associations, None))
        if profiles is not None:
            print(f"{name} again, sampled by py-spy ...", flush=True)
            sampled = e2e.measure(e2e_args(topology, count, associations, profiles / name))
            results[name]["stages"] = sampled["stages"]
            results[name]["sampled_run"] = {k: sampled[k] for k in ("images_per_second", "cpu_ms_per_image")}
    print(f"one inference worker draining {args.drain} queued images ...", flush=True)
    results["drain"] = drain.measure(args.drain, 32)
    if args.receive:
        print(f"receive, {args.receive} films, 1 and 4 associations ...", flush=True)
        out = ROOT / "bench" / "results" / "receive-tax.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "receive.py"), "--count", str(args.receive),
                        "--repeats", str(args.repeats), "--out", str(out)], check=True, cwd=ROOT)
        results["receive"] = json.loads(out.read_text())["results"]
        results["receive_pure"] = round(e2e.pure_inference_rate(32), 1)  # the model alone, this run
    for name in ("embedded", "production"):
        results[name].pop("timeline", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if profiles is not None:
        print()
        print(stage_table(results))
    print(f"wrote {args.out}")


def _ratio(rate: float, pure: float) -> str:
    return f"**{rate / pure:.3f}x**"


def table(results: dict) -> str:
    """Every figure beside the model alone measured in the same run: the ratio is the figure."""
    embedded, production, drained = results["embedded"], results["production"], results["drain"]
    rows = [
        ("`pneumoscreen run`, one association, send start to last PREDICTED",
         _ratio(embedded["images_per_second"], embedded["pure_inference_images_per_second"]),
         f"{embedded['images_per_second']} img/s ({embedded['count']} films)",
         embedded["pure_inference_images_per_second"]),
        ("production topology (`bench/e2e.py`), 2 associations",
         _ratio(production["images_per_second"], production["pure_inference_images_per_second"]),
         f"{production['images_per_second']} img/s ({production['count']} films); dispatch to result p50 "
         f"{production['latency_dispatch_to_result_seconds']['p50']} s, p95 "
         f"{production['latency_dispatch_to_result_seconds']['p95']} s",
         production["pure_inference_images_per_second"]),
        (f"one inference worker draining {drained['count']} queued images",
         _ratio(drained["worker_images_per_second"], drained["pure_inference_images_per_second"]),
         f"{drained['worker_images_per_second']} img/s; worker CPU {drained['worker_cpu_ms_per_image']} ms/image "
         f"against the forward pass's {drained['forward_pass_cpu_ms_per_image']}",
         drained["pure_inference_images_per_second"]),
    ]
    for key, label in (("1_association", "1 association"), ("4_associations", "4 associations")):
        row = results.get("receive", {}).get(key)
        if row:
            pure = results["receive_pure"]
            others = ", ".join(f"{name} {row[name]['instances_per_second']:.0f} "
                               f"({row[name]['instances_per_second'] / pure:.2f}x)"
                               for name in ("pynetdicom_alone", "orthanc", "storescp") if name in row)
            rows.append((f"receive only, {label}", _ratio(row["pneumoscreen"]["instances_per_second"], pure),
                         f"{row['pneumoscreen']['instances_per_second']:.0f} inst/s; {others}", pure))
    around = [(name, r["cpu_ms_per_image_around_the_model"], r["forward_pass_cpu_ms_per_image"])
              for name, r in (("`run`", embedded), ("production", production))]
    rows.append(("CPU per image around the forward pass, summed over processes",
                 ", ".join(f"{name} **{ms / fwd:.1f}x** the forward pass's CPU" for name, ms, fwd in around),
                 ", ".join(f"{name} {ms} ms (forward pass {fwd} ms of CPU per image)" for name, ms, fwd in around),
                 production["pure_inference_images_per_second"]))
    head = "| measure | ratio to the model alone | figure | model alone, same run (img/s, batch 32) |\n|---|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)


def stage_table(results: dict) -> str:
    """Where each millisecond of CPU per image goes, per process, from the sampled runs."""
    lines = ["| topology | process | CPU ms/image | where it goes (ms/image) |", "|---|---|---|---|"]
    for topology in ("embedded", "production"):
        report = results[topology]
        for process, ms in report["cpu_ms_per_image"].items():
            shares = _shares_for(report.get("stages", {}), process)
            parts: dict[str, float] = {}
            if shares.pop("forward pass", 0.0):
                # TensorFlow computes in native threads that py-spy does not sample: the forward pass
                # is the model alone's CPU per image, measured in the same run; the rest is split by samples
                parts["forward pass (the model alone's CPU)"] = report["forward_pass_cpu_ms_per_image"]
            rest, total = ms - sum(parts.values()), sum(shares.values())
            parts.update({stage: share / total * rest for stage, share in shares.items()} if total else {})
            spent = ", ".join(f"{stage} {value:.1f}" for stage, value in parts.items() if value >= 0.05)
            lines.append(f"| {topology} | {process} | {ms} | {spent or 'not sampled'} |")
    return "\n".join(lines)


def _shares_for(stages: dict, process: str) -> dict[str, float]:
    """The share of each stage among the samples of ``process`` (a name of ``cpu_ms_per_image``): the
    listener's are those of every receiver process and of the process named ``listener`` itself."""
    counts: dict[str, int] = {}
    for name, roles in stages.items():
        for role, samples in roles.items():
            mine = (role == "listener" or name == "listener") if process == "listener" else \
                (name == process and role == "main")
            if mine:
                for stage, n in samples.items():
                    counts[stage] = counts.get(stage, 0) + n
    total = sum(counts.values())
    return {stage: n / total for stage, n in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


if __name__ == "__main__":
    main()
