"""Compare training recipes with the k-fold check of model.validation.

Every recipe runs on the same patient folds (same seed) of ``DATA/train``;
each fold is trained as ``pneumoscreen train`` trains the final model, and
scored clean and through the acquisition perturbations. One JSON per run
(the per-fold reports and their spread, the recipe and the machine) goes
to ``--out-dir``. Choose with the shifted specificity at sensitivity 0.97
(mean over folds and its sd), not with the clean AUC, which saturates.

    .venv/bin/python bench/recipes.py --data DATA --name baseline [--augmentation standard]
        [--label-smoothing 0] [--stretch 0] [--epochs 12] [--folds 3] [--seed 1234] [--out-dir DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout folder with train/")
    parser.add_argument("--name", required=True, help="name of this run (the JSON file's stem)")
    parser.add_argument("--augmentation", default="standard", choices=("standard", "acquisition", "framing"))
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--stretch", type=float, default=0.0,
                        help="largest per-axis zoom-in of the training zoom (0: one zoom for both axes)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from model.dataset import load_folder
    from model.train import TrainingConfig, kfold_check

    config = TrainingConfig(epochs=args.epochs, seed=args.seed, augmentation=args.augmentation,
                            label_smoothing=args.label_smoothing, stretch=args.stretch, folds=args.folds)
    full = load_folder(args.data / "train", size=config.input_size,
                       cache=args.cache / f"train_{config.input_size}.npz", progress=False)
    check = kfold_check(full, config, k=args.folds)
    s = check["summary"]
    print(f"{args.name}: clean AUC {s['clean']['auc']['mean']:.4f} ± {s['clean']['auc']['sd']:.4f}, "
          f"spec@sens{config.target_sensitivity} {s['clean']['specificity']['mean']:.3f} ± "
          f"{s['clean']['specificity']['sd']:.3f}; shifted AUC {s['shifted_mean']['auc']['mean']:.4f} ± "
          f"{s['shifted_mean']['auc']['sd']:.4f}, spec {s['shifted_mean']['specificity']['mean']:.3f} ± "
          f"{s['shifted_mean']['specificity']['sd']:.3f}, worst {s['shifted_worst']['specificity']['mean']:.3f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps({
        "name": args.name, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config), "data": str(args.data), "images": len(full),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "check": check,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
