"""How much a score follows the film's frame (its width / height) rather than the lungs.

In the Kermany release pneumonia films are wider than normal ones (median width / height in
the training folders: normal 1.22, pneumonia 1.49), so the frame's proportions alone separate
the classes. A model that learnt them fails on a hospital whose detectors and collimation make
other proportions. This module measures that dependence and offers one training-side remedy:

- :func:`frame_dependence`: within each class, the Spearman correlation of the logit with the
  film's width / height, and the sensitivity and specificity in each band of width / height
  (:data:`BAND_EDGES`) at a given threshold;
- :func:`frame_balance_weights`: sample weights under which every band keeps the overall class
  proportions, so that the frame carries no label information in training;
- :func:`known_aspects`: the films whose true proportions are known (a squashed copy, such as
  the 224 x 224 re-encoding of the release, has lost them).

Numpy in, dict out; nothing here touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

#: The width / height band edges: ``< 1.2``, ``1.2-1.4`` and ``>= 1.4``.
BAND_EDGES: tuple[float, ...] = (1.2, 1.4)

#: The width / height of a squashed copy (a film resized to a square without its proportions):
#: such a film's true proportions are unknown. No film of the release with its proportions is
#: exactly square (checked on the 1,929 films of ``chest_xray/MANIFEST.tsv``).
SQUASHED_ASPECT = 1.0

#: Name of the group of films whose proportions are unknown (:func:`frame_balance_weights`).
UNKNOWN_BAND = "unknown"


def band_names(edges: Sequence[float] = BAND_EDGES) -> list[str]:
    """The bands' names, in order: ``['<1.2', '1.2-1.4', '>=1.4']`` for the default edges."""
    edges = _checked_edges(edges)
    inner = [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    return [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]


def bands(aspects: np.ndarray, edges: Sequence[float] = BAND_EDGES) -> np.ndarray:
    """Each film's band index (0 .. len(edges)); -1 where its aspect is unknown (NaN)."""
    aspects = np.asarray(aspects, dtype=float)
    index = np.digitize(aspects, _checked_edges(edges))  # a < e0 -> 0, e0 <= a < e1 -> 1, ...
    return np.where(np.isnan(aspects), -1, index)


def known_aspects(aspects: np.ndarray) -> np.ndarray:
    """``aspects`` with NaN for every squashed copy (width / height exactly :data:`SQUASHED_ASPECT`)."""
    aspects = np.asarray(aspects, dtype=float)
    return np.where(aspects == SQUASHED_ASPECT, np.nan, aspects)


def to_logit(scores: np.ndarray | float, eps: float = 1e-7) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities, clipped to ``[eps, 1 - eps]`` first."""
    p = np.clip(np.asarray(scores, dtype=float), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def frame_dependence(logits: np.ndarray, labels: np.ndarray, aspect: np.ndarray, threshold: float, *,
                     edges: Sequence[float] = BAND_EDGES) -> dict:
    """The frame dependence of one held-out set.

    ``logits``: the scores on the logit scale (a rank statistic, so any monotonic scale gives the
    same correlation); ``threshold``: on the same scale, a film at or above it is flagged (the one
    flag rule, :func:`model.artifact.flagged_at`); ``aspect``: each film's width / height, NaN
    where unknown (those films are left out). Returns ``{"n", "unknown", "spearman": {"normal",
    "pneumonia"}, "bands": {name: {...}}}``: per class the Spearman rho, its p-value and n (rho is
    None for fewer than 3 films or a constant score or aspect); per band the films of each class,
    the specificity (None without normals) and the sensitivity (None without pneumonias).
    """
    from scipy.stats import spearmanr

    from model.artifact import flagged_at

    logits, labels, aspect = _checked(logits, labels, aspect)
    known = ~np.isnan(aspect)
    logits, labels, aspect = logits[known], labels[known], aspect[known]
    flagged = flagged_at(logits, threshold)
    spearman = {}
    for name, c in (("normal", 0), ("pneumonia", 1)):
        x, y = aspect[labels == c], logits[labels == c]
        constant = len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0
        rho, p = (None, None) if constant else spearmanr(x, y)
        spearman[name] = {"rho": None if rho is None else float(rho), "p": None if p is None else float(p),
                          "n": int(len(x))}
    band_of = bands(aspect, edges)
    out_bands = {}
    for b, name in enumerate(band_names(edges)):
        normal, pneumonia = (band_of == b) & (labels == 0), (band_of == b) & (labels == 1)
        out_bands[name] = {
            "normal": int(normal.sum()), "pneumonia": int(pneumonia.sum()),
            "specificity": float(np.mean(~flagged[normal])) if normal.any() else None,
            "sensitivity": float(np.mean(flagged[pneumonia])) if pneumonia.any() else None,
        }
    return {"n": int(known.sum()), "unknown": int((~known).sum()), "spearman": spearman, "bands": out_bands}


def summarize(reports: Sequence[dict]) -> dict:
    """Over several :func:`frame_dependence` reports (folds): per class the largest |rho| and the
    mean rho; per band the lowest specificity and sensitivity (None where no report had one)."""
    if not reports:
        raise ValueError("nothing to summarize")
    out: dict = {"spearman": {}, "bands": {}}
    for name in ("normal", "pneumonia"):
        rhos = [r["spearman"][name]["rho"] for r in reports if r["spearman"][name]["rho"] is not None]
        out["spearman"][name] = {"max_abs_rho": float(np.max(np.abs(rhos))) if rhos else None,
                                 "mean_rho": float(np.mean(rhos)) if rhos else None}
    for band in reports[0]["bands"]:
        out["bands"][band] = {}
        for figure in ("specificity", "sensitivity"):
            values = [r["bands"][band][figure] for r in reports if r["bands"][band][figure] is not None]
            out["bands"][band][f"min_{figure}"] = float(np.min(values)) if values else None
    return out


def frame_balance_weights(labels: np.ndarray, aspects: np.ndarray, *,
                          edges: Sequence[float] = BAND_EDGES) -> np.ndarray:
    """Sample weights under which, within each band of width / height (and among the films of
    unknown proportions, one more group), the classes keep their overall proportions, and each
    band keeps its number of films: a film of class c in band b weighs ``p_c * n_b / n_bc``
    (``p_c`` the overall share of class c, ``n_b`` the band's films, ``n_bc`` those of class c).
    A band that holds one class only cannot be balanced: its films keep weight 1 (logged)."""
    labels = np.asarray(labels).astype(int)
    aspects = np.asarray(aspects, dtype=float)
    if labels.shape != aspects.shape or labels.ndim != 1:
        raise ValueError(f"labels and aspects must be 1-D of one length, got {labels.shape} and {aspects.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    weights = np.ones(len(labels), dtype=np.float64)
    overall = np.array([np.mean(labels == 0), np.mean(labels == 1)])
    band_of = bands(aspects, edges)
    names = band_names(edges)
    for b in np.unique(band_of):
        members = band_of == b
        counts = np.array([np.sum(members & (labels == 0)), np.sum(members & (labels == 1))])
        if counts.min() == 0:
            log.warning("width/height band %s holds one class only (%d normal, %d pneumonia): left unweighted",
                        UNKNOWN_BAND if b < 0 else names[b], counts[0], counts[1])
            continue
        for c in (0, 1):
            weights[members & (labels == c)] = overall[c] * members.sum() / counts[c]
    return weights


def _checked_edges(edges: Sequence[float]) -> list[float]:
    edges = [float(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"band edges must be one or more increasing numbers, got {edges}")
    return edges


def _checked(logits, labels, aspect) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=float)
    labels = np.asarray(labels).astype(int)
    aspect = np.asarray(aspect, dtype=float)
    if not (logits.ndim == 1 and logits.shape == labels.shape == aspect.shape):
        raise ValueError(f"logits, labels and aspect must be 1-D of one length, got "
                         f"{logits.shape}, {labels.shape} and {aspect.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    if np.isnan(logits).any():
        raise ValueError("logits must not be NaN")
    return logits, labels, aspect
