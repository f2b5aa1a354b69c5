"""`pneumoscreen train`, `evaluate` and `predict`: the model's commands."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import click

from worker.cli.context import cli, load_settings
from worker.cli.render import progress_bar

log = logging.getLogger("pneumoscreen")

LABELS_HELP = ("CSV with columns file (relative to FOLDER) and label (NORMAL/PNEUMONIA or 0/1); "
               "without it FOLDER holds NORMAL/ and PNEUMONIA/")
LABEL_VALUES = {"NORMAL": 0, "PNEUMONIA": 1, "0": 0, "1": 1}


@cli.command()
@click.option("--data", "data_dirs", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Kaggle-layout folder: train/{NORMAL,PNEUMONIA}/ (and optionally val/); repeat it to train on "
                   "several together (a film in more than one counts once, by name; val/ from the first that has one)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--version", "model_version", default="0.1.0", show_default=True)
@click.option("--folds", type=click.IntRange(min=0), default=3, show_default=True,
              help="first run the K-fold patient check (clean and acquisition-shifted figures with their "
                   "spread, written into the card); 0 skips it")
@click.option("--augmentation", "augmentations", type=click.Choice(["standard", "acquisition", "framing"]),
              multiple=True, default=["standard"], show_default=True,
              help="standard: geometry, brightness, contrast; acquisition: also gamma, contrast window, blur, "
                   "noise and crop-zoom; framing: acquisition, the crop also giving each film proportions drawn "
                   "whatever its class. Repeat it to train an ensemble, one network per augmentation, served "
                   "as one model (the mean of their logits)")
@click.option("--label-smoothing", type=click.FloatRange(0.0, 0.5, max_open=True), default=0.0, show_default=True)
@click.option("--stretch", type=click.FloatRange(0.0, 0.5), default=0.0, show_default=True,
              help="above 0: the training zoom zooms each axis in by up to this much on its own, so that a "
                   "film's proportions are less of a cue; 0: one zoom for both axes, +-10%")
@click.option("--average", type=click.Choice(["best", "swa", "ema"]), default="best", show_default=True,
              help="the weights kept: best, the epoch of highest validation AUC (stopping early); swa, the mean "
                   "of the last --average-epochs epochs' weights; ema, a moving average of every step's weights "
                   "(momentum --ema); averaged weights get batch-norm statistics re-estimated on training batches")
@click.option("--average-epochs", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--ema", type=click.FloatRange(0.5, 1.0, max_open=True), default=0.995, show_default=True)
@click.option("--input-size", type=click.IntRange(min=64), default=224, show_default=True,
              help="side of the square image the network takes (the card records it; the pipeline prepares "
                   "films at the configured model's size)")
@click.option("--sensitivity", type=click.FloatRange(0.5, 1.0, max_open=True), default=0.97, show_default=True,
              help="the sensitivity the card's threshold is for")
@click.option("--operating-point", type=click.Choice(["margin", "pooled"]), default="margin", show_default=True,
              help="margin: the threshold for the design sensitivity at which every held-out set reaches "
                   "--sensitivity at the threshold chosen on the others (a margin as wide as the sets "
                   "disagree); pooled: the threshold for --sensitivity itself on the pooled held-out sets")
@click.option("--balance-frame", is_flag=True,
              help="weight the training films so that within each band of width/height (<1.2, 1.2-1.4, >=1.4) "
                   "the classes keep their overall proportions: the frame's shape carries no label")
@click.option("--preprocessing", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="the preprocessing version the films are prepared at, written on the card: 2, the whole film "
                   "resized and equalized; 3, first cropped to its content and then to the centre square, so "
                   "the network never sees the frame's proportions")
def train(data_dirs: tuple[Path, ...], out_dir: Path, epochs: int, seed: int, model_version: str, folds: int,
          augmentations: tuple[str, ...], label_smoothing: float, stretch: float, average: str, average_epochs: int, ema: float,
          input_size: int, sensitivity: float, operating_point: str, balance_frame: bool,
          preprocessing: str) -> None:
    """Train the screening CNN and write a model artifact."""
    from model.train import TrainingConfig
    from model.train import train as run_training

    if folds == 1:
        raise click.BadParameter("use 0 (no check) or at least 2", param_hint="--folds")
    try:
        config = TrainingConfig(epochs=epochs, seed=seed, version=model_version, folds=folds,
                                augmentation=augmentations[0],
                                members=tuple(augmentations) if len(augmentations) > 1 else (),
                                label_smoothing=label_smoothing, stretch=stretch,
                                average=average, average_epochs=average_epochs, ema=ema, input_size=input_size,
                                target_sensitivity=sensitivity, operating_point=operating_point,
                                balance_frame=balance_frame, preprocessing=preprocessing)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    card = run_training(list(data_dirs), out_dir, config)
    val = card.validation["patient_split"]
    click.echo(f"wrote {out_dir}: threshold {card.threshold:.4f}, validation AUC {val['auc']:.4f}, "
               f"sensitivity {val['sensitivity']:.3f}, specificity {val['specificity']:.3f}")
    chosen = card.validation.get("operating_point")
    if chosen:
        transfer = chosen["transfer"]
        click.echo(f"operating point: design sensitivity {chosen['design_sensitivity']} for "
                   f"{chosen['target_sensitivity']}; each held-out set at the threshold chosen on the others: "
                   f"sensitivity {transfer['sensitivity']['min']:.3f}-{transfer['sensitivity']['max']:.3f}, "
                   f"specificity {transfer['specificity']['min']:.3f}-{transfer['specificity']['max']:.3f}")
    if "shifted" in card.validation:
        cv, shifted = card.validation["cross_validation"], card.validation["shifted"]
        click.echo(f"{folds}-fold check: AUC {cv['auc']['mean']:.4f} ± {cv['auc']['sd']:.4f}, "
                   f"specificity {cv['specificity']['mean']:.3f} ± {cv['specificity']['sd']:.3f}; shifted: "
                   f"AUC {shifted['mean']['auc']['mean']:.4f} ± {shifted['mean']['auc']['sd']:.4f}, "
                   f"specificity {shifted['mean']['specificity']['mean']:.3f} ± "
                   f"{shifted['mean']['specificity']['sd']:.3f} (worst {shifted['worst']['specificity']['mean']:.3f})")
    if "frame_dependence" in card.validation:
        click.echo(_frame_line(card.validation["frame_dependence"]))


def _frame_line(section: dict) -> str:
    """The frame dependence of the fold check in one line: the largest within-class |Spearman| of
    the logit with width/height over folds, and the lowest specificity per width/height band."""
    def figure(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    rho, bands = section["summary"]["spearman"], section["summary"]["bands"]
    per_band = ", ".join(f"{band} {figure(b['min_specificity'])}" for band, b in bands.items())
    return (f"frame dependence: |Spearman(logit, width/height)| at most {figure(rho['normal']['max_abs_rho'])} "
            f"among normals, {figure(rho['pneumonia']['max_abs_rho'])} among pneumonias; "
            f"lowest specificity per width/height band: {per_band}")


def _score_files(files: list[Path], model, *, batch_size: int = 32):
    """(path, probability or None, error or None) for each file, in batches of ``batch_size``."""
    import numpy as np

    from worker.images import UnreadableInput, prepare_film

    results: list[tuple[Path, float | None, str | None]] = []
    with progress_bar("screening") as progress:
        task = progress.add_task("screening", total=len(files))
        for start in range(0, len(files), batch_size):
            batch, prepared = [], []
            for path in files[start:start + batch_size]:
                try:
                    prepared.append(prepare_film(path, model.card.input_size, model.card.preprocessing_version)[1])
                    batch.append(path)
                except UnreadableInput as exc:
                    results.append((path, None, str(exc)))
            if prepared:
                for path, p in zip(batch, model.predict(np.stack(prepared))):
                    results.append((path, p, None))
            progress.advance(task, len(files[start:start + batch_size]))
    return results


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model artifact folder [default: PNEUMOSCREEN_MODEL_DIR or the shipped model]")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write roc.png, confusion_matrix.png, score_histogram.png and reliability.png here")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=LABELS_HELP)
def evaluate(folder: Path, model_dir: Path | None, as_json: bool, plots_dir: Path | None,
             labels_csv: Path | None) -> None:
    """Screen FOLDER/NORMAL and FOLDER/PNEUMONIA (PNG/JPEG or DICOM), or the files of a labels CSV, and
    report the figures with 95% intervals and the calibration of the probabilities."""
    from model.artifact import get_model
    from model.metrics import report_with_intervals

    settings = load_settings()
    model = get_model(model_dir or settings.model_dir)
    labels, scores, _, unreadable = _score_sample(model, folder, labels_csv)
    report = report_with_intervals(labels, scores, model.card.threshold)
    report["model_version"] = model.card.version
    if plots_dir is not None:
        from model.plots import write_evaluation_plots

        for path in write_evaluation_plots(labels, scores, report, plots_dir, title=f"{model.card.name} {model.card.version}"):
            log.info("wrote %s", path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from worker.cli.render import evaluation_table

    evaluation_table(report, unreadable=unreadable)


def _labelled_sample(folder: Path, labels_csv: Path | None = None) -> list[tuple[Path, int]]:
    """``(path, label)`` of a sample: ``folder/NORMAL`` and ``folder/PNEUMONIA`` (images or DICOM), or the
    files listed in ``labels_csv`` (columns ``file``, relative to ``folder``, and ``label``: NORMAL or
    PNEUMONIA, or 0 or 1)."""
    from worker.images import iter_files

    if labels_csv is None:
        found = []
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            if not (folder / cls).is_dir():
                raise ValueError(f"{folder} must hold NORMAL/ and PNEUMONIA/ folders" + ("" if labels_csv else ", or give a labels CSV"))
            found += [(path, label) for path in iter_files([folder / cls])]
        return found
    found = []
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= {n.strip().lower() for n in reader.fieldnames}:
            raise ValueError(f"{labels_csv}: expected the columns file and label")
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            label = LABEL_VALUES.get(row["label"].upper())
            if label is None:
                raise ValueError(f"{labels_csv} line {line}: label {row['label']!r} is not NORMAL, PNEUMONIA, 0 or 1")
            path = folder / row["file"]
            if not path.is_file():
                raise ValueError(f"{labels_csv} line {line}: {path} is not a file")
            found.append((path, label))
    return found


def _score_sample(model, folder: Path, labels_csv: Path | None = None):
    """(labels, scores, paths, unreadable count) of a labelled sample; unreadable files are left out
    with a warning. A usage error unless both classes have readable films."""
    import numpy as np

    try:
        labelled = _labelled_sample(folder, labels_csv)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    labels_by_path = dict(labelled)
    results = _score_files([p for p, _ in labelled], model)
    unreadable = [(p, e) for p, s, e in results if s is None]
    for _, error in unreadable:
        log.warning("left out, unreadable: %s", error)
    scored = [(p, s) for p, s, e in results if s is not None]
    labels = np.array([labels_by_path[p] for p, _ in scored], dtype=int)
    if len(set(labels.tolist())) < 2:
        raise click.ClickException("need readable images of both classes")
    return labels, np.array([s for _, s in scored], dtype=float), [p for p, _ in scored], len(unreadable)


@cli.command()
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--from-verdicts", is_flag=True,
              help="instead of FOLDER: the stored films of every study with a verdict (a radiologist's, or the "
                   "RIS's final report), one label and one score (its highest film's) per study")
@click.option("--sensitivity", type=click.FloatRange(0.5, 1.0, max_open=True), default=0.97, show_default=True,
              help="the sensitivity the site's threshold is chosen for, on its sample")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the site's model artifact (same weights, the site's threshold)")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=LABELS_HELP)
@click.option("--site", "site", help="the site's name in the new version (<version>+site.<name>) "
                                     "[default: FOLDER's name]")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model artifact to calibrate [default: PNEUMOSCREEN_MODEL_DIR or the shipped model]")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def calibrate(folder: Path | None, from_verdicts: bool, sensitivity: float, out_dir: Path, labels_csv: Path | None,
              site: str | None, model_dir: Path | None, as_json: bool) -> None:
    """Set the model's threshold on a site's labelled sample and write a site artifact.

    Reports the model's figures on the sample with 95% intervals, at the card's threshold and at the
    site's; refuses a sample too small for the requested sensitivity. Point PNEUMOSCREEN_MODEL_DIR at
    the new folder, or apply it to the archive with `pneumoscreen rescreen --model`.
    """
    from model.artifact import get_model
    from model.site import SampleTooSmall, sample_hash, site_name
    from model.site import calibrate as calibrate_site

    settings = load_settings()
    model_dir = model_dir or settings.model_dir
    if (folder is None) == (not from_verdicts) or (from_verdicts and labels_csv is not None):
        raise click.UsageError("give FOLDER (optionally with --labels) or --from-verdicts, not both")
    try:
        name = site_name(site or ("verdicts" if from_verdicts else folder.resolve().name))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if (out_dir / "model_card.json").exists():
        raise click.UsageError(f"{out_dir} already holds a model; choose another --out")
    model = get_model(model_dir)
    if from_verdicts:
        from worker.cli.verdict_sample import score_verdicts

        labels, scores, files, unreadable, sample = score_verdicts(settings, model, _score_files)
    else:
        labels, scores, paths, unreadable = _score_sample(model, folder, labels_csv)
        files, sample = list(zip(paths, labels)), {"source": f"folder {folder.resolve().name}", "unit": "film"}
    try:
        card, figures = calibrate_site(model.model_dir, labels, scores, sensitivity=sensitivity, name=name,
                                       sample_sha256=sample_hash(files), out_dir=out_dir,
                                       unreadable=unreadable, sample=sample)
    except SampleTooSmall as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"model_dir": str(out_dir), "version": card.version, "threshold": card.threshold,
                               **card.site_calibration}, indent=2))
        return
    from worker.cli.render import evaluation_table

    for key, title in (("at_card_threshold", f"the card's threshold {model.card.threshold:.4f}"),
                       ("at_site_threshold", f"the site's threshold {card.threshold:.4f}")):
        evaluation_table({**figures[key], "model_version": f"{model.card.version} at {title}"},
                         unreadable=unreadable)
    click.echo(f"wrote {out_dir}: model {card.version}, threshold {card.threshold:.4f} for sensitivity "
               f"{sensitivity:g} on {len(labels)} {sample['unit']}s. Use it with PNEUMOSCREEN_MODEL_DIR={out_dir}, or "
               f"rescreen the archive with: pneumoscreen rescreen --model {out_dir}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
@click.option("--heatmap", "heatmap_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write a Grad-CAM overlay PNG per image here")
def predict(paths: tuple[Path, ...], model_dir: Path | None, as_json: bool, heatmap_dir: Path | None) -> None:
    """Screen files or folders of DICOM or PNG/JPEG images."""
    from model.artifact import get_model
    from worker.images import iter_files

    settings = load_settings()
    model = get_model(model_dir or settings.model_dir)
    try:
        files = list(iter_files(paths))
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    results = _score_files(files, model)
    card = model.card
    rows = [{"path": str(p), "probability": None if s is None else round(s, 6),
             "flagged": None if s is None else card.flags(s), "threshold": round(card.threshold, 6),
             "model_version": card.version, "error": e} for p, s, e in results]
    if heatmap_dir is not None:
        import cv2

        from worker.heatmaps import heatmap_overlay

        heatmap_dir.mkdir(parents=True, exist_ok=True)
        for row in rows:
            if row["probability"] is None:
                continue
            out = heatmap_dir / f"{Path(row['path']).stem}_gradcam.png"
            cv2.imwrite(str(out), heatmap_overlay(Path(row["path"]), model))
            row["heatmap"] = str(out)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from worker.cli.render import predictions_table

        predictions_table(rows)
    if any(r["error"] for r in rows):
        sys.exit(1)
