"""Images for the pages, rendered on demand from the spool and kept in a bounded cache in memory
(never written into the database): the film as a viewer displays it, and its Grad-CAM overlay;
and the model card's plot and the drift window's score histogram.

The overlay is drawn for the model this API process is configured with (it loads the model
on the first overlay asked for, a few seconds), by ``worker.heatmaps.heatmap_overlay``.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from worker.heatmaps import heatmap_overlay
from worker.images import display_film

MAX_SIDE = 1024
"""Films are scaled down to this on their longest side, as in the heatmaps sent to the PACS."""
CACHE_ENTRIES = 64


class RenderCache:
    """PNG bytes by key, least recently used dropped first."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self._entries = entries
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_render(self, key: tuple, render) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        png = render()
        with self._lock:
            self._items[key] = png
            while len(self._items) > self._entries:
                self._items.popitem(last=False)
        return png


def _png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("the image could not be encoded as PNG")
    return buffer.tobytes()


def _scaled(image: np.ndarray) -> np.ndarray:
    rows, columns = image.shape[:2]
    scale = MAX_SIDE / max(rows, columns)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(columns * scale)), max(1, round(rows * scale))),
                      interpolation=cv2.INTER_AREA)


def film_png(path: Path) -> bytes:
    """The film as displayed (windowed, MONOCHROME1 inverted), scaled down."""
    return _png(_scaled(display_film(path)))


def gradcam_png(path: Path, model) -> bytes:
    """The Grad-CAM overlay of ``model`` (a ``LoadedModel``) on the film, in the film's own
    proportions, scaled down."""
    return _png(_scaled(heatmap_overlay(path, model)))


def card_plot_png(card) -> bytes:
    """The model card as plots: the ROC curve and the reliability of the probabilities on the patient
    split (when the card carries them, with the operating point marked), and the specificity at the
    operating point on each check the card records, with the fold spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation = card.validation or {}
    split = validation.get("patient_split", {})
    found = split.get("curves")
    figure, axes = plt.subplots(1, 3 if found else 1, figsize=(15 if found else 6.4, 4.2), dpi=90, squeeze=False)
    axes = list(axes[0])
    if found:
        roc, reliability = found["roc"], found["reliability"]
        axis = axes.pop(0)
        axis.plot(roc["fpr"], roc["tpr"], color="#3b6ea5", label=f"AUC {split.get('auc', float('nan')):.4f}")
        axis.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        if "specificity" in split and "sensitivity" in split:
            axis.plot([1 - split["specificity"]], [split["sensitivity"]], "o", color="#d9534f",
                      label=f"threshold {card.threshold:.3f}")
        axis.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
                 title=f"ROC, patient split ({split.get('n', '?')} images)")
        axis.legend(loc="lower right")
        axis = axes.pop(0)
        axis.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        axis.plot([b["mean_predicted"] for b in reliability], [b["fraction_positive"] for b in reliability], "o-",
                  color="#3b6ea5")
        for b in reliability:
            axis.annotate(str(b["count"]), (b["mean_predicted"], b["fraction_positive"]), fontsize=7,
                          textcoords="offset points", xytext=(3, -9))
        axis.set(xlabel="mean predicted probability (bin)", ylabel="fraction with pneumonia", xlim=(0, 1),
                 ylim=(0, 1.01), title=f"Reliability, Brier {found['brier']:.4f} (n per bin)")
    _specificity_bars(axes.pop(0), card, validation)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    plt.close(figure)
    return out.getvalue()


def _specificity_bars(axis, card, validation: dict) -> None:
    labels, values, errors = [], [], []

    def add(label: str, value, sd=0.0) -> None:
        if isinstance(value, (int, float)):
            labels.append(label)
            values.append(float(value))
            errors.append(float(sd or 0.0))

    add("patient split", validation.get("patient_split", {}).get("specificity"))
    folds = validation.get("cross_validation", {}).get("specificity", {})
    add("folds, clean", folds.get("mean"), folds.get("sd"))
    shifted = validation.get("shifted", {})
    add("folds, shifted (mean)", shifted.get("mean", {}).get("specificity", {}).get("mean"),
        shifted.get("mean", {}).get("specificity", {}).get("sd"))
    add("folds, worst shift", shifted.get("worst", {}).get("specificity", {}).get("mean"),
        shifted.get("worst", {}).get("specificity", {}).get("sd"))
    add("official val/", validation.get("official_val", {}).get("specificity"))
    if values:
        positions = np.arange(len(values))
        axis.barh(positions, values, xerr=errors, color="#3b6ea5", capsize=4)
        axis.set_yticks(positions, labels)
        axis.invert_yaxis()
        for y, v in zip(positions, values):
            axis.text(v - 0.02, y, f"{v:.3f}", va="center", ha="right", color="white", fontweight="bold")
    else:
        axis.text(0.5, 0.5, "the model card records no validation figures", ha="center", va="center")
    axis.set_xlim(0, 1)
    axis.set_xlabel("specificity at the threshold")
    axis.set_title(f"Normal films left unflagged ({card.version})")


def drift_plot_png(reference_scores, window_scores, *, threshold: float, version: str) -> bytes:
    """The drift window's scores against the model's held-out scores: two histograms (share of films
    per bin, so windows of any size compare) and the threshold, flagged films to its right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.linspace(0.0, 1.0, 21)
    figure, axis = plt.subplots(figsize=(11, 3.4), dpi=90)
    for scores, label, colour, style in ((reference_scores, "held-out films (reference)", "#999999", "stepfilled"),
                                         (window_scores, "films screened lately (window)", "#3b6ea5", "step")):
        scores = np.asarray(scores, dtype=float)
        if scores.size:
            axis.hist(scores, bins=bins, weights=np.full(scores.size, 1.0 / scores.size), histtype=style,
                      color=colour, alpha=0.6 if style == "stepfilled" else 1.0, linewidth=2,
                      label=f"{label}, {scores.size}")
    axis.axvline(threshold, color="#d9534f", linestyle="--", label=f"threshold {threshold:.3f}")
    axis.set(xlabel="probability of pneumonia", ylabel="share of films", xlim=(0, 1),
             title=f"Scores of model {version}: the window against the reference")
    axis.legend(loc="upper center", fontsize=8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    plt.close(figure)
    return out.getvalue()
