"""Screening metrics: ROC AUC, the operating threshold, confusion counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.artifact import flagged_at


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity (recall of label 1) is at least ``sensitivity``, under
    the one flag rule (``model.artifact.flagged_at``: a score at or above the threshold is flagged)."""
    positives = np.sort(np.asarray(scores)[np.asarray(labels) == 1])
    if positives.size == 0:
        raise ValueError("no positive examples to set a threshold on")
    # allow at most floor((1 - sensitivity) * n) misses: the lowest positives, below the threshold
    misses = int(np.floor((1.0 - sensitivity) * positives.size + 1e-9))
    return float(np.clip(positives[misses], 1e-6, 1 - 1e-6))


def binary_report(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Precision, recall (sensitivity), specificity, F1, accuracy, AUC and counts at ``threshold``."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    pred = flagged_at(scores, threshold)
    tp = int(np.sum(pred & (labels == 1)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    tn = int(np.sum(~pred & (labels == 0)))

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else 0.0

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    auc = float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")
    return {
        "n": int(len(labels)), "auc": auc, "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp), "precision": precision, "f1": f1,
        "accuracy": ratio(tp + tn, len(labels)), "threshold": float(threshold),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def curves(labels: np.ndarray, scores: np.ndarray, *, points: int = 64, bins: int = 10) -> dict:
    """What a card shows as plots: the ROC curve (at most ``points`` points, the ends kept), the
    reliability of the probabilities (``bins`` equal-width bins: mean predicted, fraction positive,
    count) and the Brier score."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("curves need examples of both classes")
    fpr, tpr, _ = roc_curve(labels, scores)
    keep = np.unique(np.round(np.linspace(0, len(fpr) - 1, min(points, len(fpr)))).astype(int))
    reliability = []
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    for b in range(bins):
        members = index == b
        if members.any():
            reliability.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                                "mean_predicted": float(scores[members].mean()),
                                "fraction_positive": float(labels[members].mean()), "count": int(members.sum())})
    return {"roc": {"fpr": [round(float(v), 5) for v in fpr[keep]], "tpr": [round(float(v), 5) for v in tpr[keep]]},
            "reliability": reliability, "brier": float(np.mean((scores - labels) ** 2))}


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between predicted probability and observed
    fraction positive, over ``bins`` equal-width bins."""
    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if labels.size == 0:
        raise ValueError("no scores")
    index = np.clip(np.digitize(scores, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap += members.sum() * abs(scores[members].mean() - labels[members].mean())
    return float(gap / labels.size)


def calibration_figures(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    return {"brier": float(np.mean((scores - labels) ** 2)), "ece": expected_calibration_error(labels, scores)}


def spread(values: Sequence[float]) -> dict:
    """A figure over several models or folds: mean, sample sd (0 for one value), min, max and the values."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": float(np.min(v)), "max": float(np.max(v)), "values": [float(x) for x in v]}


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sensitivity, specificity): sound at 0 and 1 and on small samples."""
    from scipy.stats import norm

    if trials <= 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def auc_interval(labels: np.ndarray, scores: np.ndarray, *, draws: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap (by image, stratified by class) percentile interval of the ROC AUC."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        values.append(roc_auc_score(labels[pick], scores[pick]))
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def report_with_intervals(labels: np.ndarray, scores: np.ndarray, threshold: float, *,
                          auc_draws: int | None = 1000) -> dict:
    """``binary_report`` with 95 % intervals (``ci95``: Wilson for sensitivity and specificity,
    bootstrap for the AUC, ``auc_draws`` draws; None leaves the AUC's out, as it takes seconds) and
    the calibration figures (Brier score, ECE)."""
    report = binary_report(labels, scores, threshold)
    report["ci95"] = {"sensitivity": list(proportion_interval(report["tp"], report["tp"] + report["fn"])),
                      "specificity": list(proportion_interval(report["tn"], report["tn"] + report["fp"]))}
    if auc_draws is not None:
        report["ci95"]["auc"] = list(auc_interval(labels, scores, draws=auc_draws))
    report["calibration"] = calibration_figures(labels, scores)
    return report
