"""Evaluation plots (PNG): ROC with the operating point, confusion matrix, score histograms, reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_evaluation_plots(labels: np.ndarray, scores: np.ndarray, report: dict, out_dir: str | Path,
                           *, title: str = "") -> list[Path]:
    """Write roc.png, confusion_matrix.png, score_histogram.png and reliability.png into ``out_dir``."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC {report['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - report["specificity"]], [report["sensitivity"]], c="red", zorder=3,
               label=f"threshold {report['threshold']:.3f}: sens {report['sensitivity']:.3f}, "
                     f"spec {report['specificity']:.3f}")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title=f"ROC {title}".strip(), xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "roc.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    matrix = np.array([[report["tn"], report["fp"]], [report["fn"], report["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["NORMAL", "PNEUMONIA"], yticklabels=["NORMAL", "PNEUMONIA"],
           xlabel="predicted", ylabel="true", title=f"Confusion matrix at {report['threshold']:.3f}")
    fig.tight_layout()
    written.append(out_dir / "confusion_matrix.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"NORMAL (n={int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"PNEUMONIA (n={int((labels == 1).sum())})")
    ax.axvline(report["threshold"], c="red", ls="--", label="threshold")
    ax.set(xlabel="P(pneumonia)", ylabel="images", title="Scores per class", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "score_histogram.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    written.append(write_reliability_plot(labels, scores, out_dir / "reliability.png", title=title))
    return written


def write_reliability_plot(labels: np.ndarray, scores: np.ndarray, path: str | Path, *, title: str = "",
                           bins: int = 10) -> Path:
    """The reliability curve: observed fraction of pneumonia against the predicted probability
    (equal-width bins, the count of each bin under it), with the Brier score and ECE."""
    from model.metrics import curves
    from model.metrics import calibration_figures

    plt = _pyplot()
    rows = curves(labels, scores, bins=bins)["reliability"]
    figures = calibration_figures(labels, scores)
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot([r["mean_predicted"] for r in rows], [r["fraction_positive"] for r in rows], marker="o", lw=2,
            label=f"model (Brier {figures['brier']:.3f}, ECE {figures['ece']:.3f})")
    ax.set(ylabel="observed fraction with pneumonia", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Reliability {title}".strip())
    ax.legend(loc="upper left", fontsize=8)
    counts.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["count"] for r in rows], width=1 / bins * 0.9,
               color="tab:blue", alpha=0.6)
    counts.set(xlabel="predicted probability of pneumonia", ylabel="images", yscale="log")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
