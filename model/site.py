"""Site calibration: a model's threshold set again on a site's own labelled films.

The shipped threshold is chosen on Kermany films; a site's detectors, patients
and processing move the scores. ``pneumoscreen calibrate`` scores a labelled
sample of the site's films, reports the model's figures on it with 95 %
intervals (at the card's threshold and at the site's), and writes a derived
artifact: the same weights, the threshold for the requested sensitivity on
the site's sample, and a card that records the sample (hash, size) and the
figures, with version ``<version>+site.<name>``.

A sample too small to support the requested sensitivity is refused: the
threshold for sensitivity s is set by the lowest-scoring pneumonia films,
and unless about three of them fall below it (at least ``3 / (1 - s)``
pneumonia films: 100 for 0.97) it is one or two films' threshold and does
not hold at the next.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model.artifact import CARD_FILE, WEIGHTS_FILE, ModelCard, read_card, sha256_file
from model.drift import HELD_OUT_SCORES_FILE, REFERENCE_INPUTS_FILE
from model.metrics import report_with_intervals, threshold_for_sensitivity

#: Misses at the target sensitivity that the sample must be able to show (see the module's docstring).
EXPECTED_MISSES = 3
#: Normal films needed to say anything about specificity.
MIN_NORMALS = 20
#: ``<version>+site.<name>`` must fit the 32 characters a stored result keeps of a model version.
MAX_NAME = 20

class SampleTooSmall(ValueError):
    """The sample cannot support the requested sensitivity; the message says what it needs."""


def minimum_positives(sensitivity: float) -> int:
    return math.ceil(EXPECTED_MISSES / (1.0 - sensitivity) - 1e-9)


def shortfall(labels: np.ndarray, sensitivity: float) -> dict[str, int]:
    """How many more labelled pneumonia and normal examples ``labels`` needs before it can carry a
    threshold for ``sensitivity`` (0 and 0 when it can)."""
    labels = np.asarray(labels)
    return {"pneumonia": max(0, minimum_positives(sensitivity) - int(np.sum(labels == 1))),
            "normal": max(0, MIN_NORMALS - int(np.sum(labels == 0)))}


def check_sample(labels: np.ndarray, sensitivity: float) -> None:
    """Raise :class:`SampleTooSmall` unless ``labels`` can carry a threshold for ``sensitivity``."""
    positives, normals = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    needed = minimum_positives(sensitivity)
    missing = shortfall(labels, sensitivity)
    problems = []
    if missing["pneumonia"]:
        problems.append(f"{positives} pneumonia films; a threshold for sensitivity {sensitivity:g} needs at least "
                        f"{needed}, so that about {EXPECTED_MISSES} fall below it (a threshold set by one or two films "
                        f"does not hold at the next film)")
    if missing["normal"]:
        problems.append(f"{normals} normal films; specificity needs at least {MIN_NORMALS}")
    if problems:
        raise SampleTooSmall("the sample is too small: " + "; ".join(problems)
                             + ". Add labelled films, or ask for a lower --sensitivity.")


def site_figures(labels: np.ndarray, scores: np.ndarray, *, card_threshold: float, sensitivity: float,
                 auc_interval: bool = True) -> tuple[float, dict]:
    """The threshold ``labels`` and ``scores`` give for ``sensitivity``, and the figures with 95 % intervals
    at the card's threshold and at that one (``at_card_threshold``, ``at_site_threshold``); without
    ``auc_interval`` no bootstrap of the AUC (seconds). Needs examples of both classes; whether the sample
    supports the threshold is :func:`check_sample`'s to say."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("site figures need labelled examples of both classes")
    threshold = threshold_for_sensitivity(labels, scores, sensitivity)
    draws = 1000 if auc_interval else None
    return threshold, {"at_card_threshold": report_with_intervals(labels, scores, card_threshold, auc_draws=draws),
                       "at_site_threshold": report_with_intervals(labels, scores, threshold, auc_draws=draws)}


def site_name(text: str) -> str:
    """A name fit for a version's local part: lower-case letters, digits and dots."""
    name = re.sub(r"[^a-z0-9]+", ".", text.lower()).strip(".")
    if not name:
        raise ValueError(f"{text!r} gives no usable site name (letters and digits)")
    if len(name) > MAX_NAME:
        raise ValueError(f"site name {name!r} is longer than {MAX_NAME} characters")
    return name


def sample_hash(files: list[tuple[Path, int]]) -> str:
    """sha256 of the sample: each file's content hash with its label, in sorted order."""
    lines = sorted(f"{sha256_file(path)}\t{label}\n" for path, label in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def calibrate(model_dir: Path, labels: np.ndarray, scores: np.ndarray, *, sensitivity: float, name: str,
              sample_sha256: str, out_dir: Path, unreadable: int = 0,
              sample: dict | None = None) -> tuple[ModelCard, dict]:
    """Write the site artifact into ``out_dir``; returns its card and the figures (``at_card_threshold``,
    ``at_site_threshold``). ``sample`` (where the sample came from, what one label is of) goes on the card.
    The model's drift reference (held-out scores, reference input statistics) goes with it."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    check_sample(labels, sensitivity)
    name = site_name(name)
    base = read_card(model_dir)
    threshold, figures = site_figures(labels, scores, card_threshold=base.threshold, sensitivity=sensitivity)
    if (out_dir / CARD_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a model; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_dir / WEIGHTS_FILE, out_dir / WEIGHTS_FILE)
    for reference in (HELD_OUT_SCORES_FILE, REFERENCE_INPUTS_FILE):
        if (model_dir / reference).is_file():
            shutil.copy2(model_dir / reference, out_dir / reference)
    base_version = base.version.split("+", 1)[0]
    card = ModelCard(**{
        **asdict(base),
        "version": f"{base_version}+site.{name}",
        "threshold": threshold,
        "site_calibration": {
            "site": name, "base_version": base.version, "base_threshold": base.threshold,
            "target_sensitivity": sensitivity, "sample_sha256": sample_sha256, "images": int(labels.size),
            "pneumonia": int(labels.sum()), "normal": int((labels == 0).sum()), "unreadable_left_out": unreadable,
            "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"), **(sample or {}), **figures,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    card.write(out_dir / CARD_FILE)
    read_card(out_dir)  # the weights and card agree
    return card, figures
