"""Evaluation plots (PNG): ROC with the operating point, confusion matrix, score histograms."""

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
    """Write roc.png, confusion_matrix.png and score_histogram.png into ``out_dir``."""
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
    return written
