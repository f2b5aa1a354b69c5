"""The operating point: calibrated probabilities and a threshold that transfers.

A threshold chosen on one held-out split does not say what another site will
see. On the Kermany films the network's scores saturate near 1, so the
threshold for a target sensitivity sits wherever the few lowest-scoring
pneumonias of that split happen to fall: the three folds that made 0.4.0
chose 0.09, 0.24 and 0.47 for the same sensitivity, the patient split 0.905.
The raw score is no scale to carry a threshold from one model or sample to
another.

So a training run measures its operating point on every held-out score set it
has (each k-fold model's held-out fold and the final model's patient split):

- :func:`fit_platt` maps each set's scores to calibrated probabilities
  (logistic regression on the logit, fitted on that set): the scale a
  threshold is carried on;
- :func:`transferable_threshold` pools the calibrated sets and chooses the
  threshold for the target sensitivity on the pool, with a bootstrap interval,
  and measures the transfer itself: each set scored at the threshold chosen on
  the OTHER sets (leave one out), calibrated and raw. The leave-one-out
  figures are what a new site sees when it takes the card's threshold.

The final network's last layer absorbs its calibration (:func:`fold_into_dense`),
so the served score is the calibrated probability, on the worklist and in the
SR, and the card's threshold is a probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.artifact import flagged_at
from model.metrics import calibration_figures, spread, threshold_for_sensitivity

EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class Platt:
    """``p' = sigmoid(slope * logit(p) + intercept)``."""

    slope: float = 1.0
    intercept: float = 0.0

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return sigmoid(self.slope * logit(scores) + self.intercept)

    def as_dict(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept}


def fit_platt(labels: np.ndarray, scores: np.ndarray) -> Platt:
    """The Platt map that makes ``scores`` calibrated probabilities on this set (both classes needed)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("calibration needs examples of both classes")
    fit = LogisticRegression(C=1e4, max_iter=1000).fit(logit(scores).reshape(-1, 1), labels)
    slope = float(fit.coef_[0, 0])
    if slope <= 0:
        raise ValueError("the scores rank the classes the wrong way round; they cannot be calibrated")
    return Platt(slope, float(fit.intercept_[0]))


def _at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    labels = np.asarray(labels).astype(int)
    flagged = flagged_at(np.asarray(scores), threshold)
    positives, negatives = labels == 1, labels == 0
    return {"sensitivity": float(flagged[positives].mean()) if positives.any() else float("nan"),
            "specificity": float((~flagged[negatives]).mean()) if negatives.any() else float("nan")}


#: Written by a training run beside its weights: every held-out score set its operating point was
#: chosen on (raw scores), so that the threshold can be chosen again without training again.
HELD_OUT_FILE = "held_out_scores.npz"

#: The highest design sensitivity :func:`design_sensitivity` tries.
DESIGN_CEILING = 0.995
DESIGN_STEP = 0.001


def _pooled_threshold(calibrated: Sequence[tuple[np.ndarray, np.ndarray]], members: Sequence[int],
                      sensitivity: float) -> float:
    return threshold_for_sensitivity(np.concatenate([calibrated[j][0] for j in members]),
                                     np.concatenate([calibrated[j][1] for j in members]), sensitivity)


def design_sensitivity(calibrated: Sequence[tuple[np.ndarray, np.ndarray]], target_sensitivity: float) -> float:
    """The sensitivity to choose a pooled threshold at so that ``target_sensitivity`` holds on
    sets it was not chosen on: the lowest one, from the target up in steps of 0.001, at which
    every set of ``calibrated`` ((labels, calibrated scores) pairs) reaches the target at the
    threshold chosen on the others. The target itself with fewer than two sets;
    :data:`DESIGN_CEILING` if no lower one does."""
    if len(calibrated) < 2:
        return target_sensitivity
    steps = int(round((DESIGN_CEILING - target_sensitivity) / DESIGN_STEP))
    for step in range(max(steps, 0) + 1):
        design = round(target_sensitivity + step * DESIGN_STEP, 6)
        if all(_at(*calibrated[i], _pooled_threshold(calibrated, [j for j in range(len(calibrated)) if j != i],
                                                     design))["sensitivity"] >= target_sensitivity
               for i in range(len(calibrated))):
            return design
    return DESIGN_CEILING


def transferable_threshold(sets: Sequence[tuple[str, np.ndarray, np.ndarray]], *, target_sensitivity: float,
                           margin: bool = True, bootstrap: int = 1000, seed: int = 0) -> dict:
    """The operating point of held-out score sets ``(name, labels, scores)`` (one per model).

    Returns the threshold (a calibrated probability) on the pooled calibrated scores with its
    bootstrap 95 % interval, each set's Platt map and own threshold, and the leave-one-out
    transfer: each set at the threshold chosen on the others, calibrated (``transfer``) and, for
    comparison, raw (``transfer_raw``).

    Without ``margin`` the threshold is the pooled one for ``target_sensitivity``: what a new
    site then sees scatters around the target, half the sites below it. With ``margin`` (the
    default) it is the pooled one for the :func:`design_sensitivity` of the sets, the margin the
    sets' own spread asks for; the transfer of that rule is measured nested, each left-out set
    at the threshold whose design sensitivity was found on the others alone.
    """
    if len(sets) < 2:
        raise ValueError("a transferable threshold needs at least two held-out sets")
    calibrated, per_set = [], []
    for name, labels, scores in sets:
        labels = np.asarray(labels).astype(int)
        platt = fit_platt(labels, scores)
        p = platt(scores)
        calibrated.append((labels, p))
        per_set.append({"name": name, "n": int(labels.size), "platt": platt.as_dict(),
                        "raw_threshold": threshold_for_sensitivity(labels, scores, target_sensitivity),
                        "threshold": threshold_for_sensitivity(labels, p, target_sensitivity),
                        "raw": calibration_figures(labels, scores), "calibrated": calibration_figures(labels, p)})
    everyone = list(range(len(sets)))
    design = design_sensitivity(calibrated, target_sensitivity) if margin else target_sensitivity
    pooled_labels = np.concatenate([lab for lab, _ in calibrated])
    pooled = np.concatenate([p for _, p in calibrated])
    threshold = _pooled_threshold(calibrated, everyone, design)

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        pick = rng.integers(0, pooled.size, pooled.size)
        if pooled_labels[pick].any():
            draws.append(threshold_for_sensitivity(pooled_labels[pick], pooled[pick], design))

    transfer, transfer_raw = [], []
    for i, (name, labels, scores) in enumerate(sets):
        others = [j for j in everyone if j != i]
        own_design = (design_sensitivity([calibrated[j] for j in others], target_sensitivity) if margin
                      else target_sensitivity)
        t = _pooled_threshold(calibrated, others, own_design)
        t_raw = threshold_for_sensitivity(np.concatenate([np.asarray(sets[j][1]) for j in others]),
                                          np.concatenate([np.asarray(sets[j][2]) for j in others]), target_sensitivity)
        transfer.append({"name": name, "design_sensitivity": own_design, "threshold": t,
                         **_at(calibrated[i][0], calibrated[i][1], t)})
        transfer_raw.append({"name": name, "threshold": t_raw, **_at(labels, scores, t_raw)})

    if margin:
        method = (f"threshold on the pooled held-out sets, each calibrated on itself (Platt), for the design "
                  f"sensitivity {design}: the lowest at which every set reaches {target_sensitivity} at the "
                  "threshold chosen on the others; transfer = each set at the threshold this rule chooses on "
                  "the others alone")
    else:
        method = (f"threshold for sensitivity {target_sensitivity} on the pooled held-out sets, each calibrated "
                  "on itself (Platt); transfer = each set at the threshold chosen on the others")
    return {
        "method": method,
        "target_sensitivity": target_sensitivity,
        "design_sensitivity": design,
        "threshold": threshold,
        "ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
        "pooled": {"n": int(pooled.size), **_at(pooled_labels, pooled, threshold)},
        "sets": per_set,
        "own_thresholds": spread([row["threshold"] for row in per_set]),
        "own_thresholds_raw": spread([row["raw_threshold"] for row in per_set]),
        "transfer": {"sets": transfer, "sensitivity": spread([row["sensitivity"] for row in transfer]),
                     "specificity": spread([row["specificity"] for row in transfer])},
        "transfer_raw": {"sets": transfer_raw, "sensitivity": spread([row["sensitivity"] for row in transfer_raw]),
                         "specificity": spread([row["specificity"] for row in transfer_raw])},
    }


def save_held_out(path, sets: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write held-out score sets ``(name, labels, raw scores)`` to ``path`` (``.npz``)."""
    np.savez_compressed(path, names=np.array([name for name, _, _ in sets]),
                        sizes=np.array([len(labels) for _, labels, _ in sets]),
                        labels=np.concatenate([np.asarray(labels, dtype=np.int8) for _, labels, _ in sets]),
                        scores=np.concatenate([np.asarray(scores, dtype=np.float64) for _, _, scores in sets]))


def load_held_out(path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The sets :func:`save_held_out` wrote, in their order; feed them to :func:`transferable_threshold`."""
    with np.load(path) as f:
        bounds = np.concatenate([[0], np.cumsum(f["sizes"])])
        return [(str(name), f["labels"][a:b].astype(int), f["scores"][a:b].astype(float))
                for name, a, b in zip(f["names"], bounds[:-1], bounds[1:])]


def fold_into_dense(model, platt: Platt, layer_name: str = "pneumonia") -> None:
    """Make ``model``'s sigmoid output layer return ``platt`` of what it returned:
    ``sigmoid(slope * (w.x + b) + intercept) = sigmoid((slope w).x + slope b + intercept)``."""
    layer = model.get_layer(layer_name)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * platt.slope, bias * platt.slope + platt.intercept])
