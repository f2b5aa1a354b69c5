"""The site's labelled sample from its own verdicts, for `pneumoscreen calibrate --from-verdicts`:
every study with a current verdict, its screened (eligible, frontal) films read from the spool and
scored by the model being calibrated, one label and one score per study (its highest film's, as the
worklist flags a study: ``worker.site_sample.per_study``, the operations page's rule too)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from worker.cli.context import require_current_schema, sessions
from worker.site_sample import per_study

log = logging.getLogger("pneumoscreen")


def score_verdicts(settings, model, score_files):
    """(labels, scores, files as (path, label), unreadable film count, sample facts for the card), one
    entry per study; ``score_files`` scores a list of paths (``training._score_files``)."""
    from db.verdicts import labelled_studies

    require_current_schema(settings)
    with sessions()() as session:
        studies = labelled_studies(session)
    paths = [Path(p) for study in studies for p in study["films"]]
    if not paths:
        raise click.ClickException("no study with a verdict has a screened film yet: record verdicts on "
                                   "screened studies (study page or POST /studies/{uid}/verdict) first")
    scored = {path: (score, error) for path, score, error in score_files(paths, model)}
    by_study, files, unreadable = [], [], 0
    for study in studies:
        mine = [scored[Path(p)] for p in study["films"]]
        for _, error in mine:
            if error is not None:
                unreadable += 1
                log.warning("left out, unreadable: %s", error)
        readable = [score for score, error in mine if error is None]
        by_study.append((study["label"], readable))
        if readable:
            files += [(Path(p), study["label"]) for p in study["films"]]
    labels, scores = per_study(by_study)
    sample = {"source": "verdicts", "unit": "study", "studies": int(labels.size), "films": len(files)}
    return labels, scores, files, unreadable, sample
