"""Verdicts: what a study showed, as a radiologist recorded it or the RIS's final report said.

Nothing is overwritten: each change is a new row with who and when. A study's current
verdict is its newest radiologist's verdict, or, when no radiologist recorded one, the
newest from a report (``VerdictSource.RIS_REPORT``): a radiologist wins over a report.
These current verdicts are the site's labelled sample (``labelled_studies``).
Session in, caller commits.
"""

from __future__ import annotations

import enum
from datetime import timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Account, Instance, InstanceState, Prediction, Series, Study, Verdict, utcnow

MAX_ACTOR, MAX_REFERENCE = 128, 128


class Finding(str, enum.Enum):
    """What the study shows."""

    PNEUMONIA = "pneumonia"
    """Pneumonia is present."""
    NORMAL = "normal"
    """No pneumonia."""

    @property
    def label(self) -> int:
        """1 for pneumonia, 0 for normal (the labels of the training data and the calibration)."""
        return int(self is Finding.PNEUMONIA)


class VerdictSource(str, enum.Enum):
    """Who said it."""

    RADIOLOGIST = "radiologist"
    """A radiologist, signed in with their own account (wins over a report)."""
    RIS_REPORT = "ris-report"
    """The RIS's final report, read from its coded values."""


#: the order of precedence: a source earlier here wins over the ones after it
PRECEDENCE = (VerdictSource.RADIOLOGIST, VerdictSource.RIS_REPORT)


class UnknownStudy(LookupError):
    """No study with that StudyInstanceUID has been received."""


def _iso(value) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()


def record_verdict(session: Session, *, study_instance_uid: str, finding: Finding | str,
                   source: VerdictSource | str, actor: str, account: Account | None = None,
                   reference: str | None = None) -> dict[str, Any]:
    """Add a verdict to the study's history; returns it as :func:`verdict_history` shows it."""
    finding, source = Finding(finding), VerdictSource(source)
    if not actor or len(actor) > MAX_ACTOR:
        raise ValueError(f"actor must be 1-{MAX_ACTOR} characters")
    if reference is not None and len(reference) > MAX_REFERENCE:
        raise ValueError(f"reference must be at most {MAX_REFERENCE} characters")
    study_id = session.scalar(select(Study.id).where(Study.StudyInstanceUID == study_instance_uid))
    if study_id is None:
        raise UnknownStudy(f"no study {study_instance_uid}")
    verdict = Verdict(study_id=study_id, finding=finding.value, source=source.value, actor=actor,
                      account_id=account.id if account is not None else None, reference=reference,
                      recorded_at=utcnow())
    session.add(verdict)
    session.flush()
    return _row(verdict)


def _row(v: Verdict) -> dict[str, Any]:
    return {"finding": v.finding, "source": v.source, "actor": v.actor, "reference": v.reference,
            "recorded_at": _iso(v.recorded_at)}


def _current(history: list[Verdict]) -> Verdict | None:
    for source in PRECEDENCE:
        mine = [v for v in history if v.source == source.value]
        if mine:
            return mine[-1]
    return None


def study_verdicts(session: Session, *, study_instance_uid: str) -> dict[str, Any]:
    """``{"verdict": the current one or None, "verdicts": every one, oldest first}``."""
    history = list(session.scalars(
        select(Verdict).join(Study, Verdict.study_id == Study.id)
        .where(Study.StudyInstanceUID == study_instance_uid).order_by(Verdict.recorded_at, Verdict.id)))
    current = _current(history)
    return {"verdict": None if current is None else _row(current), "verdicts": [_row(v) for v in history]}


def _current_by_study(session: Session) -> dict[int, Verdict]:
    by_study: dict[int, list[Verdict]] = {}
    for v in session.scalars(select(Verdict).order_by(Verdict.recorded_at, Verdict.id)):
        by_study.setdefault(v.study_id, []).append(v)
    return {study_id: _current(history) for study_id, history in by_study.items()}


def current_verdicts(session: Session) -> dict[int, Finding]:
    """Study id -> its current finding, for every study with a verdict."""
    return {study_id: Finding(v.finding) for study_id, v in _current_by_study(session).items()}


def labelled_studies(session: Session) -> list[dict[str, Any]]:
    """Every study with a current verdict and at least one screened (frontal, eligible) film:
    ``{"study_instance_uid", "label", "films": [spool paths]}``, oldest study first. The films are
    those that ended PREDICTED: eligibility (chest, frontal view) was judged when they came in."""
    findings = current_verdicts(session)
    if not findings:
        return []
    rows = session.execute(
        select(Study.id, Study.StudyInstanceUID, Instance.path)
        .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
        .where(Study.id.in_(list(findings)), Instance.state == InstanceState.PREDICTED)
        .order_by(Study.id, Instance.id)).all()
    studies: dict[int, dict[str, Any]] = {}
    for study_id, uid, path in rows:
        entry = studies.setdefault(study_id, {"study_instance_uid": uid, "label": findings[study_id].label,
                                              "films": []})
        entry["films"].append(path)
    return list(studies.values())


def verdict_counts(session: Session) -> dict[str, int]:
    """How many studies have a verdict: in all, by current finding, and how many rows the history holds."""
    findings = current_verdicts(session)
    return {"studies": len(findings),
            "pneumonia": sum(f is Finding.PNEUMONIA for f in findings.values()),
            "normal": sum(f is Finding.NORMAL for f in findings.values()),
            "recorded": session.scalar(select(func.count(Verdict.id))) or 0}


def labelled_scores(session: Session, *, model_version: str) -> list[dict[str, Any]]:
    """Every study with a current verdict, oldest study first: ``{"study_instance_uid", "label", "source"
    (of the current verdict), "probability"}``, the probability the highest ``model_version`` stored for
    the study's films (as the worklist flags a study), None when that model screened none of them."""
    current = _current_by_study(session)
    if not current:
        return []
    highest = dict(session.execute(
        select(Series.study_id, func.max(Prediction.probability))
        .join(Instance, Instance.series_id == Series.id).join(Prediction, Prediction.instance_id == Instance.id)
        .where(Series.study_id.in_(select(Verdict.study_id)), Prediction.model_version == model_version)
        .group_by(Series.study_id)).all())
    uids = dict(session.execute(select(Study.id, Study.StudyInstanceUID)
                                .where(Study.id.in_(select(Verdict.study_id)))).all())
    return [{"study_instance_uid": uids[study_id], "label": Finding(v.finding).label, "source": v.source,
             "probability": None if highest.get(study_id) is None else float(highest[study_id])}
            for study_id, v in sorted(current.items())]
