"""How much the shipped model's held-out scores follow the film's frame (width / height).

The model artifact keeps the raw held-out scores its threshold was chosen on
(``held_out_scores.npz``: per set a name, the labels and the scores, in the order of the set's
films, but no file names). The sets are reproducible: ``train`` lists each data folder's
``train/`` in a fixed order, combines them (a film in several counts once, from the first), and
cuts the folds and the patient split with the card's seed. This script rebuilds that list from
the folders named on the card, checks it against the card (the manifest hash of every film's
class and name, each set's label sequence and each fold's threshold), and joins each score to
its film's original width / height from the folder's ``MANIFEST.tsv`` (``orig_width`` and
``orig_height``; a folder whose manifest lacks them, such as the squashed 224 x 224 copies, gives
no proportions and its films are left out of the figures). Then, per held-out set, at the
threshold chosen on that set for the card's target sensitivity (as the card's fold check does):
the within-class Spearman correlation of the logit with width / height and the specificity and
sensitivity per band of width / height (:func:`model.frame.frame_dependence`), and the AUC of
width / height alone as a score (how much the frame tells the class on these films).

No network runs: the scores are the card's. A second or two.

    .venv/bin/python bench/frame_dependence.py [--model DIR] [--data DIR ...] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.artifact import DEFAULT_MODEL_DIR, read_card  # noqa: E402
from model.dataset import CLASSES, LabelledImages, combine, list_images, patient_id, patient_split  # noqa: E402
from model.frame import frame_dependence, to_logit  # noqa: E402
from model.metrics import threshold_for_sensitivity  # noqa: E402
from model.operating_point import HELD_OUT_FILE, load_held_out  # noqa: E402
from model.train import _manifest_hash  # noqa: E402
from model.validation import patient_folds  # noqa: E402


def training_list(data_dirs: list[Path]) -> LabelledImages:
    """The films ``train`` combined from ``data_dirs``, in its order, without their pixels."""
    parts = []
    for folder in data_dirs:
        entries = list_images(folder / "train")
        parts.append(LabelledImages(np.zeros((len(entries), 1, 1), np.uint8),
                                    np.array([label for _, label in entries], dtype=np.int64),
                                    np.array([patient_id(p.name) for p, _ in entries]),
                                    [p for p, _ in entries], np.full(len(entries), np.nan)))
    return combine(parts)


def original_aspects(films: LabelledImages, data_dirs: list[Path]) -> np.ndarray:
    """Each film's original width / height from its folder's ``MANIFEST.tsv``; NaN where unknown."""
    known: dict[tuple[Path, str, str], float] = {}
    for folder in data_dirs:
        manifest = folder / "MANIFEST.tsv"
        if not manifest.is_file():
            continue
        with manifest.open(newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row.get("orig_width") and row.get("orig_height"):
                    key = ((folder / row["split"]).resolve(), row["class"], row["filename"])
                    known[key] = float(row["orig_width"]) / float(row["orig_height"])
    return np.array([known.get((Path(p).parent.parent.resolve(), Path(p).parent.name, Path(p).name), np.nan)
                     for p in films.paths])


def held_out_index(card, films: LabelledImages) -> dict[str, np.ndarray]:
    """The film indices of every held-out set the card's run scored, by the set's name."""
    seed, k = card.training["seed"], card.validation.get("cross_validation", {}).get("folds", 0)
    sets = {}
    if k:
        sets = {f"fold {i + 1}": test for i, (_, test) in
                enumerate(patient_folds(films.labels, films.patients, k=k, seed=seed))}
    fraction = float(card.training_data["validation_split"].split("% of")[0].rsplit(" ", 1)[-1]) / 100
    sets["patient split"] = patient_split(films, val_fraction=fraction, seed=seed)[1]
    return sets


def measure(model_dir: Path, data_dirs: list[Path] | None = None) -> dict:
    """The figures of every held-out set of the artifact in ``model_dir``; ``data_dirs``: the
    folders it was trained on, in their order (default: those its card names, relative ones
    taken from the repository root)."""
    card = read_card(model_dir)
    data_dirs = data_dirs or [Path(d.strip()) if Path(d.strip()).is_absolute() else (ROOT / d.strip())
                              for d in card.training_data["folder"].split(",")]
    films = training_list(data_dirs)
    if _manifest_hash(films) != card.training_data["manifest_sha256"]:
        raise SystemExit(f"the films under {data_dirs} are not the ones the card was trained on (manifest hash)")
    aspects, index = original_aspects(films, data_dirs), held_out_index(card, films)
    target = card.training["target_sensitivity"]
    fold_thresholds = card.validation.get("cross_validation", {}).get("threshold", {}).get("values", [])
    out = {"model": f"{card.name} {card.version}", "target_sensitivity": target, "sets": {}}
    for i, (name, labels, scores) in enumerate(load_held_out(model_dir / HELD_OUT_FILE)):
        idx = index[name]
        if not np.array_equal(films.labels[idx], labels):
            raise SystemExit(f"{name}: the rebuilt set's labels differ from the stored ones; cannot join")
        threshold = threshold_for_sensitivity(labels, scores, target)
        if name.startswith("fold") and not np.isclose(threshold, fold_thresholds[i]):
            raise SystemExit(f"{name}: threshold {threshold} is not the card's {fold_thresholds[i]}")
        a = aspects[idx]
        known = ~np.isnan(a)
        from sklearn.metrics import roc_auc_score

        report = frame_dependence(to_logit(scores), labels, a, float(to_logit(threshold)))
        report.update(threshold=threshold, films=len(idx),
                      aspect_auc=float(roc_auc_score(labels[known], a[known])),
                      median_aspect={c.lower(): float(np.median(a[known & (labels == j)]))
                                     for j, c in enumerate(CLASSES)})
        out["sets"][name] = report
    return out


def print_report(result: dict) -> None:
    print(f"{result['model']}: held-out sets, threshold per set for sensitivity {result['target_sensitivity']}")
    for name, r in result["sets"].items():
        s = r["spearman"]
        print(f"\n{name}: {r['films']} films, {r['n']} with original width/height "
              f"(median normal {r['median_aspect']['normal']:.2f}, pneumonia {r['median_aspect']['pneumonia']:.2f}; "
              f"width/height alone AUC {r['aspect_auc']:.3f}); threshold {r['threshold']:.4f}")
        print(f"  Spearman(logit, width/height): normal {s['normal']['rho']:+.3f} (p {s['normal']['p']:.1e}, "
              f"n {s['normal']['n']}), pneumonia {s['pneumonia']['rho']:+.3f} (p {s['pneumonia']['p']:.1e}, "
              f"n {s['pneumonia']['n']})")
        for band, b in r["bands"].items():
            spec = "-" if b["specificity"] is None else f"{b['specificity']:.3f}"
            sens = "-" if b["sensitivity"] is None else f"{b['sensitivity']:.3f}"
            print(f"  width/height {band:>8}: {b['normal']:4d} normal, specificity {spec}; "
                  f"{b['pneumonia']:4d} pneumonia, sensitivity {sens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model artifact folder")
    parser.add_argument("--data", type=Path, action="append",
                        help="a folder the model was trained on, repeated in the training's order "
                             "[default: those the card names]")
    parser.add_argument("--json-out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    result = measure(args.model, args.data)
    print_report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
