"""The site's labelled sample and what it supports: one label and one score per study (its highest
film's, as the worklist flags a study), the figures at the card's threshold and at the threshold the
sample gives for a sensitivity, with 95 % intervals, and how many more labelled studies it needs.

Shared by `pneumoscreen calibrate --from-verdicts` (scores from the model being calibrated, run on
the stored films) and the operations page (:func:`site_sample`: the probabilities the configured
model stored when it screened the films; no model is run).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy.orm import Session

from db.verdicts import Finding, VerdictSource, labelled_scores
from model.artifact import ModelCard
from model.site import MIN_NORMALS, SampleTooSmall, check_sample, minimum_positives, shortfall, site_figures

#: The sensitivity asked for when neither the setting nor the model card names one.
DEFAULT_SENSITIVITY = 0.95


def per_study(studies: Iterable[tuple[int, Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) from ``(label, the scores of its films)`` per study: one label and the highest
    score of each study; a study without a score is left out."""
    labels, scores = [], []
    for label, film_scores in studies:
        if len(film_scores):
            labels.append(int(label))
            scores.append(float(max(film_scores)))
    return np.array(labels, dtype=int), np.array(scores, dtype=float)


def target_sensitivity(card: ModelCard | None, configured: float | None = None) -> float:
    """The sensitivity the site's threshold is worked out for: ``configured`` (the setting), else the one
    the card's threshold was chosen for (a site card's, or the training's target), else 0.95."""
    if configured is not None:
        return float(configured)
    if card is not None:
        for found in (card.site_calibration.get("target_sensitivity"),
                      (card.validation.get("operating_point") or {}).get("target_sensitivity"),
                      card.training.get("target_sensitivity")):
            if isinstance(found, (int, float)) and 0.5 < found < 1.0:
                return float(found)
    return DEFAULT_SENSITIVITY


def _counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts = {kind: {f.value: 0 for f in Finding} for kind in (*(s.value for s in VerdictSource), "all")}
    for row in rows:
        finding = (Finding.PNEUMONIA if row["label"] else Finding.NORMAL).value
        counts[row["source"]][finding] += 1
        counts["all"][finding] += 1
    return counts


def site_sample(session: Session, *, card: ModelCard, sensitivity: float) -> dict:
    """The site's labelled sample as ``card``'s model scored it when it screened the films:
    ``labelled`` (studies with a verdict, by the verdict's source and finding), ``sample`` (those the model
    screened: pneumonia, normal), ``needed`` (the least pneumonia and normal studies for ``sensitivity``),
    ``more_needed``, ``enough``, and with studies of both findings ``site_threshold`` and the figures
    ``at_card_threshold``, ``at_site_threshold`` (as ``model.site.site_figures`` gives them, with the
    AUC but not its bootstrap interval, which would take seconds)."""
    rows = labelled_scores(session, model_version=card.version)
    labels, scores = per_study((r["label"], [] if r["probability"] is None else [r["probability"]]) for r in rows)
    out: dict = {
        "model_version": card.version, "card_threshold": card.threshold, "sensitivity": sensitivity,
        "labelled": _counts(rows), "unscreened": sum(r["probability"] is None for r in rows),
        "sample": {"studies": int(labels.size), "pneumonia": int(labels.sum()), "normal": int((labels == 0).sum())},
        "needed": {"pneumonia": minimum_positives(sensitivity), "normal": MIN_NORMALS},
        "more_needed": shortfall(labels, sensitivity),
    }
    try:
        check_sample(labels, sensitivity)
        out["enough"] = True
    except SampleTooSmall as exc:
        out["enough"], out["refusal"] = False, str(exc)
    if labels.size and labels.min() != labels.max():
        out["site_threshold"], figures = site_figures(labels, scores, card_threshold=card.threshold,
                                                      sensitivity=sensitivity, auc_interval=False)
        out.update(figures)
    return out
