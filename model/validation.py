"""A harder internal check than one random patient split.

A single random patient split of ``train/`` scores near AUC 1 and cannot tell
models apart, while images from another acquisition (the official test films)
cost a lot of specificity at the screening threshold. This module measures
that from the training data alone:

- :func:`patient_folds`: k folds by patient, stratified by class;
- :func:`fold_report`: on one held-out fold, the clean AUC, the threshold for
  the target sensitivity chosen on that clean fold, the sensitivity and
  specificity at it; and the same held-out images after each deterministic
  acquisition perturbation (:data:`PERTURBATIONS`), scored at the clean
  threshold, with their mean and worst case;
- :func:`aggregate`: mean, sd, min and max of every figure over folds (and
  seeds, when several runs are pooled);
- :func:`cross_validate`: the three above around a caller-supplied ``fit``.

The perturbations act on the display image, BEFORE the shared
:func:`model.preprocessing.prepare`, as a different scanner, exposure or
display window would. Since preprocessing version 2, ``prepare`` equalizes the
histogram, which undoes the pure tone curves (the gamma shifts) almost
exactly; they stay in the check as a guard against a preprocessing that
would stop doing so. The two one-axis crops (``crop_rows_0.8``, the top and
bottom tenth cut off, and ``crop_columns_0.8``) change the film's
proportions: in the Kermany set the proportions alone separate the classes
(normal films are narrower), and a model that learnt them loses its
specificity or its sensitivity there. Everything here is numpy in, dict
out; the network is only reached through the ``fit`` callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from model.metrics import binary_report, spread, threshold_for_sensitivity
from model.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION, prepare, read_image_file

log = logging.getLogger(__name__)

#: Seed of the fixed noise pattern of the ``noise`` perturbation.
NOISE_SEED = 20261126


def _grid_scale(image: np.ndarray, size: int) -> float:
    """How many display pixels make one network-input pixel (at least 1)."""
    return max(1.0, min(image.shape[:2]) / size)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(image, np.clip(np.rint(table), 0, 255).astype(np.uint8))


def gamma(image: np.ndarray, value: float) -> np.ndarray:
    """Display gamma: ``255 * (x / 255) ** value`` (below 1 brightens, above 1 darkens)."""
    x = np.arange(256, dtype=np.float64) / 255.0
    return _lut(image, 255.0 * x ** value)


def contrast_window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """A narrower display window: grey levels ``low..high`` (fractions of 255) stretched to 0..255."""
    x = np.arange(256, dtype=np.float64) / 255.0
    return _lut(image, 255.0 * np.clip((x - low) / (high - low), 0.0, 1.0))


def gaussian_blur(image: np.ndarray, sigma: float, size: int = INPUT_SIZE) -> np.ndarray:
    """Gaussian blur of ``sigma`` network-input pixels (scaled to the display resolution)."""
    s = sigma * _grid_scale(image, size)
    return cv2.GaussianBlur(image, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)


def gaussian_noise(image: np.ndarray, sd: float, size: int = INPUT_SIZE, seed: int = NOISE_SEED) -> np.ndarray:
    """Additive Gaussian noise of ``sd`` grey levels as seen at the network input.

    The pattern is fixed by ``seed`` (deterministic); its display-resolution
    sd is scaled so that the area averaging in ``prepare`` leaves about ``sd``.
    """
    noise = np.random.default_rng(seed).normal(0.0, sd * _grid_scale(image, size), image.shape)
    return np.clip(np.rint(image.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def centre_crop(image: np.ndarray, fraction: float, axis: int | None = None) -> np.ndarray:
    """The centre ``fraction`` of each side, or only of the rows (``axis=0``) or the
    columns (``axis=1``): a tighter field of view, or a film collimated to other
    proportions (``prepare`` then stretches it to the input square)."""
    rows, cols = image.shape[:2]
    h = max(2, round(rows * fraction)) if axis in (None, 0) else rows
    w = max(2, round(cols * fraction)) if axis in (None, 1) else cols
    top, left = (rows - h) // 2, (cols - w) // 2
    return np.ascontiguousarray(image[top:top + h, left:left + w])


def down_up_scale(image: np.ndarray, factor: float, size: int = INPUT_SIZE) -> np.ndarray:
    """Lose resolution: shrink to ``factor`` of the network grid, then enlarge back."""
    rows, cols = image.shape[:2]
    scale = factor / _grid_scale(image, size)
    small = cv2.resize(image, (max(2, round(cols * scale)), max(2, round(rows * scale))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)


#: The deterministic acquisition shifts of the check, by name; each maps a
#: display-ready ``uint8`` grey image to another of the same kind.
PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma_0.6": partial(gamma, value=0.6),
    "gamma_1.6": partial(gamma, value=1.6),
    "window_0.15_0.85": partial(contrast_window, low=0.15, high=0.85),
    "blur_sigma1.5": partial(gaussian_blur, sigma=1.5),
    "noise_sd10": partial(gaussian_noise, sd=10.0),
    "crop_zoom_0.85": partial(centre_crop, fraction=0.85),
    "crop_rows_0.8": partial(centre_crop, fraction=0.8, axis=0),
    "crop_columns_0.8": partial(centre_crop, fraction=0.8, axis=1),
    "down_up_0.5": partial(down_up_scale, factor=0.5),
}


def perturb(image: np.ndarray, name: str) -> np.ndarray:
    """Apply the perturbation ``name`` of :data:`PERTURBATIONS` to a display image."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}, expected one of {sorted(PERTURBATIONS)}")
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 display image, got {image.dtype} {image.shape}")
    return PERTURBATIONS[name](image)


def shifted_images(paths: Sequence[str | Path], *, size: int = INPUT_SIZE,
                   names: Sequence[str] = tuple(PERTURBATIONS),
                   version: str = PREPROCESSING_VERSION) -> dict[str, np.ndarray]:
    """Each file read once, perturbed by each of ``names``, then ``prepare``d at ``version``:
    ``{name: (n, size, size) uint8}`` in the order of ``paths``."""
    out = {name: np.empty((len(paths), size, size), dtype=np.uint8) for name in names}
    for i, path in enumerate(paths):
        image = read_image_file(path)
        for name in names:
            out[name][i] = prepare(perturb(image, name), size, version)
    return out


def patient_folds(labels: np.ndarray, patients: np.ndarray, *, k: int = 3,
                  seed: int = 1234) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, held-out) index pairs: every patient on one side, classes stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, patients = np.asarray(labels), np.asarray(patients)
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if labels.shape != patients.shape:
        raise ValueError("labels and patients must have one entry per image")
    for c in (0, 1):
        n = len(set(patients[labels == c]))
        if n < k:
            raise ValueError(f"class {c} has {n} patients, fewer than the {k} folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(len(labels)), labels, groups=patients)]


def _at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    r = binary_report(labels, scores, threshold)
    return {"auc": r["auc"], "sensitivity": r["sensitivity"], "specificity": r["specificity"]}


def fold_report(labels: np.ndarray, scores: np.ndarray, shifted_scores: Mapping[str, np.ndarray], *,
                target_sensitivity: float = 0.97) -> dict:
    """The check's figures for one held-out fold.

    ``scores`` are the clean held-out scores; the threshold for
    ``target_sensitivity`` is chosen on them and applied unchanged to each
    perturbation's scores in ``shifted_scores`` (same images, same order).
    """
    labels = np.asarray(labels).astype(int)
    threshold = threshold_for_sensitivity(labels, scores, target_sensitivity)
    clean = binary_report(labels, scores, threshold)
    shifted = {name: _at(labels, s, threshold) for name, s in shifted_scores.items()}
    report = {
        "n": clean["n"], "threshold": threshold,
        "clean": {"auc": clean["auc"], "sensitivity": clean["sensitivity"], "specificity": clean["specificity"]},
        "shifted": shifted,
    }
    if shifted:
        metrics = ("auc", "sensitivity", "specificity")
        report["shifted_mean"] = {m: float(np.mean([v[m] for v in shifted.values()])) for m in metrics}
        report["shifted_worst"] = {m: float(np.min([v[m] for v in shifted.values()])) for m in metrics}
        report["shifted_worst"]["perturbation"] = min(shifted, key=lambda n: shifted[n]["specificity"])
    return report


def aggregate(reports: Sequence[Mapping]) -> dict:
    """Mean, sample sd (0 for one report), min, max and values of every figure over
    :func:`fold_report` results (folds, or folds of several seeds pooled)."""
    if not reports:
        raise ValueError("nothing to aggregate")
    out: dict = {"n_reports": len(reports), "threshold": spread([r["threshold"] for r in reports]),
                 "clean": {m: spread([r["clean"][m] for r in reports]) for m in reports[0]["clean"]}}
    if reports[0].get("shifted"):
        names = list(reports[0]["shifted"])
        out["shifted"] = {n: {m: spread([r["shifted"][n][m] for r in reports]) for m in reports[0]["shifted"][n]}
                          for n in names}
        for key in ("shifted_mean", "shifted_worst"):
            out[key] = {m: spread([r[key][m] for r in reports]) for m in ("auc", "sensitivity", "specificity")}
        out["shifted_worst"]["perturbations"] = [r["shifted_worst"]["perturbation"] for r in reports]
    return out


#: ``fit(train_index, held_out_index, fold)`` -> (a function from prepared
#: images to scores, a dict of training facts to keep in the report).
FitFunction = Callable[[np.ndarray, np.ndarray, int], tuple[Callable[[np.ndarray], np.ndarray], dict]]


def cross_validate(images: np.ndarray, labels: np.ndarray, patients: np.ndarray,
                   shifted: Mapping[str, np.ndarray], fit: FitFunction, *, k: int = 3, seed: int = 1234,
                   target_sensitivity: float = 0.97) -> dict:
    """Run the check: for each patient fold, ``fit`` on the rest, score the
    held-out images clean and shifted, and report per fold and aggregated.
    ``held_out`` keeps each fold's held-out indices and clean scores (for the
    operating point; not for the card)."""
    folds, held_out = [], []
    for fold, (train_idx, test_idx) in enumerate(patient_folds(labels, patients, k=k, seed=seed)):
        log.info("fold %d/%d: %d training, %d held-out images", fold + 1, k, len(train_idx), len(test_idx))
        score, facts = fit(train_idx, test_idx, fold)
        clean_scores = score(images[test_idx])
        held_out.append({"index": test_idx, "scores": clean_scores})
        report = fold_report(labels[test_idx], clean_scores,
                             {name: score(s[test_idx]) for name, s in shifted.items()},
                             target_sensitivity=target_sensitivity)
        report.update(fold=fold, training=facts)
        folds.append(report)
        log.info("fold %d: clean AUC %.4f spec %.3f; shifted mean AUC %.4f spec %.3f", fold + 1,
                 report["clean"]["auc"], report["clean"]["specificity"],
                 report.get("shifted_mean", {}).get("auc", float("nan")),
                 report.get("shifted_mean", {}).get("specificity", float("nan")))
    return {"k": k, "seed": seed, "target_sensitivity": target_sensitivity,
            "perturbations": list(shifted), "folds": folds, "summary": aggregate(folds), "held_out": held_out}
