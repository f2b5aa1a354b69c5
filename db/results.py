"""Reading the results: the radiologists' worklist, the instances, one study in
detail. Each function takes a session and keyword-only arguments; none writes.

An instance's current answer is its latest prediction (after a rescreen, the
newest model's); older answers stay in the database and in ``study_detail``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Select, and_, case, func, select
from sqlalchemy.orm import Session, aliased

from db.models import TERMINAL_STATES, Instance, InstanceState, ModelVersion, Prediction, Series, Study
from db.queries import iso_utc
from db.session import in_chunks

#: Worklist priority: 1 = flagged (read first), 2 = not yet screened or some
#: image could not be screened (a person must look), 3 = screened, nothing flagged.
PRIORITY_FLAGGED, PRIORITY_PENDING, PRIORITY_ROUTINE = 1, 2, 3


class StudyState(str, enum.Enum):
    """A study's place in screening, as the worklist shows it."""

    IN_PROGRESS = "IN_PROGRESS"
    """Some image is still being received or screened."""
    SCREENED = "SCREENED"
    """Every image has ended and at least one was screened."""
    FAILED = "FAILED"
    """Every image has ended, none was screened, at least one failed."""
    NOT_SCREENED = "NOT_SCREENED"
    """Every image was skipped (not an eligible chest radiograph)."""


class WorklistOrder(str, enum.Enum):
    """How studies are ordered within a priority."""

    PROBABILITY = "probability"
    """Highest probability first, then oldest first (the default)."""
    RECEIVED = "received"
    """Oldest first, whatever the probability."""


def received_window(since: date | None, until: date | None, zone: str) -> tuple[datetime | None, datetime | None]:
    """Calendar days in time zone ``zone`` -> [start of ``since``, start of the day after ``until``)
    in UTC, the bounds ``worklist`` takes. ValueError if ``until`` is before ``since``."""
    if since is not None and until is not None and until < since:
        raise ValueError(f"until ({until}) is before since ({since})")
    tz = ZoneInfo(zone)

    def start(day: date) -> datetime:
        return datetime.combine(day, time.min, tzinfo=tz).astimezone(timezone.utc)

    return (None if since is None else start(since)), (None if until is None else start(until + timedelta(days=1)))


def any_image_flagged(flagged) -> ColumnElement[int]:
    """The study-level flag rule in SQL, built here once for every query that groups images by
    study: 1 when any of the study's images is flagged (``flagged`` true), else 0.

    The rule itself is ``model.artifact.study_flagged``, beside ``ModelCard.flags``; db/ imports
    nothing from model/ (imports run one way), so this is its SQL form, and
    tests/test_flag_rule.py holds the two to the same answers."""
    return func.coalesce(func.max(case((flagged, 1), else_=0)), 0)


def _latest_prediction_ids():
    """instance_id -> the id of its latest prediction."""
    return (select(Prediction.instance_id, func.max(Prediction.id).label("prediction_id"))
            .group_by(Prediction.instance_id).subquery())


def worklist(
    session: Session, *, flagged_only: bool = False, limit: int | None = None, offset: int = 0,
    received_since: datetime | None = None, received_until: datetime | None = None,
    state: StudyState | str | None = None, order: WorklistOrder | str = WorklistOrder.PROBABILITY,
    study_instance_uids: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Studies in reading order: flagged first, then studies in progress or with
    failed images, then the rest; within a priority by ``order``. ``population_note``: a note of
    one of its screened images (``Instance.population_note``), the most serious when they differ.

    ``received_since``/``received_until`` bound the study's first arrival
    ([since, until)); ``state`` keeps only studies in that ``StudyState``;
    ``study_instance_uids`` only those studies.
    """
    order = WorklistOrder(order)
    state = StudyState(state) if state is not None else None
    latest = _latest_prediction_ids()
    flagged = any_image_flagged(Prediction.flagged)
    open_count = func.sum(case((Instance.state.not_in(TERMINAL_STATES), 1), else_=0))
    failed_count = func.sum(case((Instance.state == InstanceState.FAILED, 1), else_=0))
    predicted_count = func.count(Prediction.id)
    max_probability = func.max(Prediction.probability)
    # a screened image's note; "outside ..." sorts after "age unknown ...", so it is the one shown
    population_note = func.max(case((Instance.state == InstanceState.PREDICTED, Instance.population_note)))
    priority = case(
        (flagged == 1, PRIORITY_FLAGGED),
        ((open_count > 0) | (failed_count > 0), PRIORITY_PENDING),
        else_=PRIORITY_ROUTINE,
    )
    # the one study-state rule: what the worklist shows and what ``state`` filters on
    study_state = case(
        (open_count > 0, StudyState.IN_PROGRESS.value),
        (predicted_count > 0, StudyState.SCREENED.value),
        (failed_count > 0, StudyState.FAILED.value),
        else_=StudyState.NOT_SCREENED.value,
    )
    within = ([max_probability.desc().nulls_last(), Study.received_at] if order is WorklistOrder.PROBABILITY
              else [Study.received_at])
    stmt: Select = (
        select(
            Study.StudyInstanceUID, Study.AccessionNumber, Study.StudyDate, Study.received_at,
            priority.label("priority"), flagged.label("flagged"), max_probability.label("max_probability"),
            study_state.label("state"), func.count(Instance.id).label("images"),
            func.max(Prediction.model_version).label("model_version"), population_note.label("population_note"),
        )
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Prediction, Prediction.id == latest.c.prediction_id)
        .group_by(Study.id)
        .order_by(priority, *within, Study.id)
    )
    if study_instance_uids is not None:
        stmt = stmt.where(Study.StudyInstanceUID.in_(list(study_instance_uids)))
    if received_since is not None:
        stmt = stmt.where(Study.received_at >= received_since)
    if received_until is not None:
        stmt = stmt.where(Study.received_at < received_until)
    if flagged_only:
        stmt = stmt.having(flagged == 1)
    if state is not None:
        stmt = stmt.having(study_state == state.value)
    if offset:
        stmt = stmt.offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        {
            "study_instance_uid": r.StudyInstanceUID, "accession_number": r.AccessionNumber,
            "priority": int(r.priority), "flagged": bool(r.flagged),
            "max_probability": None if r.max_probability is None else round(float(r.max_probability), 6),
            "state": r.state,
            "received_at": iso_utc(r.received_at), "model_version": r.model_version,
            "study_date": r.StudyDate, "images": int(r.images), "population_note": r.population_note,
        }
        for r in session.execute(stmt)
    ]


def list_instances(session: Session, *, state: InstanceState | None = None, limit: int | None = None,
                   offset: int = 0, study_instance_uid: str | None = None,
                   newest_first: bool = False) -> list[dict[str, Any]]:
    """Every received instance with its state, reason and latest probability (oldest first, or newest)."""
    latest = _latest_prediction_ids()
    stmt = (
        select(Instance, Series.SeriesInstanceUID, Study.StudyInstanceUID, Prediction.probability,
               Prediction.model_version)
        .outerjoin(Series, Instance.series_id == Series.id)
        .outerjoin(Study, Series.study_id == Study.id)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Prediction, Prediction.id == latest.c.prediction_id)
        .order_by(Instance.id.desc() if newest_first else Instance.id)
    )
    if state is not None:
        stmt = stmt.where(Instance.state == state)
    if study_instance_uid is not None:
        stmt = stmt.where(Study.StudyInstanceUID == study_instance_uid)
    if offset:
        stmt = stmt.offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        {
            "sop_instance_uid": inst.SOPInstanceUID, "study_instance_uid": study_uid,
            "series_instance_uid": series_uid, "state": inst.state.value, "reason": inst.reason,
            "probability": None if probability is None else round(float(probability), 6),
            "model_version": model_version, "updated_at": iso_utc(inst.updated_at),
            "population_note": inst.population_note,
        }
        for inst, series_uid, study_uid, probability, model_version in session.execute(stmt)
    ]


def unscreened_reasons(session: Session, *, study_instance_uids: Collection[str]) -> dict[str, list[str]]:
    """Why images of each study were not screened: study UID -> ``"STATE: reason"`` of its SKIPPED
    and FAILED images, each once, oldest first. One query per 500 studies, however many images."""
    reasons: dict[str, dict[str, None]] = {}
    for uids in in_chunks(list(study_instance_uids)):
        rows = session.execute(
            select(Study.StudyInstanceUID, Instance.state, Instance.reason)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Study.StudyInstanceUID.in_(uids), Instance.reason.is_not(None),
                   Instance.state.in_([InstanceState.SKIPPED, InstanceState.FAILED]))
            .order_by(Instance.id)
        )
        for uid, state, reason in rows:
            if reason:
                reasons.setdefault(uid, {}).setdefault(f"{state.value}: {reason}", None)
    return {uid: list(seen) for uid, seen in reasons.items()}


def open_instance_count(session: Session, *, instance_ids: list[int]) -> int:
    """How many of ``instance_ids`` have not ended yet (not PREDICTED, SKIPPED or FAILED)."""
    return sum(session.scalar(select(func.count()).select_from(Instance)
                              .where(Instance.id.in_(ids), Instance.state.not_in(TERMINAL_STATES)))
               for ids in in_chunks(instance_ids))


def studies_progress(session: Session, *, study_instance_uids: Collection[str]) -> tuple[int, int]:
    """(instances arrived, instances ended) over the studies ``study_instance_uids``."""
    arrived, ended = 0, 0
    for uids in in_chunks(list(study_instance_uids)):
        row = session.execute(
            select(func.count(Instance.id),
                   func.coalesce(func.sum(case((Instance.state.in_(TERMINAL_STATES), 1), else_=0)), 0))
            .join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id)
            .where(Study.StudyInstanceUID.in_(uids))
        ).one()
        arrived, ended = arrived + int(row[0]), ended + int(row[1])
    return arrived, ended


def known_studies(session: Session, *, study_instance_uids: Collection[str]) -> set[str]:
    """Those of ``study_instance_uids`` already in the database."""
    known: set[str] = set()
    for uids in in_chunks(list(study_instance_uids)):
        known.update(session.scalars(select(Study.StudyInstanceUID).where(Study.StudyInstanceUID.in_(uids))))
    return known


def instance_path(session: Session, *, sop_instance_uid: str) -> str | None:
    """The spool path of an instance, or None when it is unknown."""
    return session.scalar(select(Instance.path).where(Instance.SOPInstanceUID == sop_instance_uid))


def study_detail(session: Session, *, study_instance_uid: str) -> dict[str, Any] | None:
    """One study: its worklist row, and each instance with every model's answer (None if unknown)."""
    study = session.scalars(select(Study).where(Study.StudyInstanceUID == study_instance_uid)).one_or_none()
    if study is None:
        return None
    summary = next(iter(worklist(session, study_instance_uids=[study_instance_uid])), None)
    rows = session.execute(
        select(Instance, Series.SeriesInstanceUID, Series.Modality)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .order_by(Series.id, Instance.id)
    ).all()
    predictions: dict[int, list[Prediction]] = {}
    for p in session.scalars(select(Prediction).where(Prediction.instance_id.in_([i.id for i, _, _ in rows]))
                             .order_by(Prediction.id)):
        predictions.setdefault(p.instance_id, []).append(p)
    instances = []
    for inst, series_uid, modality in rows:
        answers = predictions.get(inst.id, [])
        instances.append({
            "sop_instance_uid": inst.SOPInstanceUID, "series_instance_uid": series_uid, "modality": modality,
            "sop_class_uid": inst.SOPClassUID, "state": inst.state.value, "reason": inst.reason,
            "population_note": inst.population_note, "received_at": iso_utc(inst.received_at),
            "probability": round(float(answers[-1].probability), 6) if answers else None,
            "model_version": answers[-1].model_version if answers else None,
            "predictions": [
                {"model_name": p.model_name, "model_version": p.model_version, "weights_sha256": p.weights_sha256,
                 "probability": round(float(p.probability), 6), "threshold": p.threshold, "flagged": p.flagged,
                 "created_at": iso_utc(p.created_at)}
                for p in answers
            ],
        })
    return {**(summary or {}), "study_instance_uid": study.StudyInstanceUID,
            "accession_number": study.AccessionNumber, "study_date": study.StudyDate,
            "received_at": iso_utc(study.received_at), "instances": instances}


def rescreen_changes(session: Session, *, instance_ids: list[int], model_version: str) -> dict[str, Any]:
    """What ``model_version`` changed for ``instance_ids``, compared with each one's previous answer.

    Returns counts (``rescreened``, ``pending``, ``not_screened``: ended SKIPPED or FAILED
    without an answer, ``newly_flagged``, ``unflagged``, ``unchanged``) and the studies of those
    instances whose flag changed (``changed_studies``: study UID, accession number, before, after;
    a study's flag by ``any_image_flagged`` over its images ``model_version`` answered, with each
    one's previous answer before).
    """
    result = {"rescreened": 0, "pending": 0, "not_screened": 0, "newly_flagged": 0, "unflagged": 0,
              "unchanged": 0}
    if not instance_ids:
        return {**result, "changed_studies": []}
    answers: dict[int, list[Prediction]] = {}
    ended_unanswered: set[int] = set()
    for ids in in_chunks(instance_ids):
        for p in session.scalars(select(Prediction).where(Prediction.instance_id.in_(ids)).order_by(Prediction.id)):
            answers.setdefault(p.instance_id, []).append(p)
        ended_unanswered.update(session.scalars(select(Instance.id).where(
            Instance.id.in_(ids), Instance.state.in_([InstanceState.SKIPPED, InstanceState.FAILED]))))
    rescreened: list[int] = []
    for instance_id in instance_ids:
        history = answers.get(instance_id, [])
        new = next((p for p in history if p.model_version == model_version), None)
        old = next((p for p in reversed(history) if p.model_version != model_version), None)
        if new is None:
            result["not_screened" if instance_id in ended_unanswered else "pending"] += 1
            continue
        result["rescreened"] += 1
        rescreened.append(instance_id)
        was = bool(old.flagged) if old is not None else False
        if new.flagged and not was:
            result["newly_flagged"] += 1
        elif was and not new.flagged:
            result["unflagged"] += 1
        else:
            result["unchanged"] += 1
    changed = [{"study_instance_uid": row.StudyInstanceUID, "accession_number": row.AccessionNumber,
                "flagged_before": bool(row.before), "flagged_after": bool(row.after)}
               for row in _study_flags(session, instance_ids=rescreened, model_version=model_version)
               if bool(row.before) != bool(row.after)]
    return {**result, "changed_studies": sorted(changed, key=lambda study: study["study_instance_uid"])}


def _study_flags(session: Session, *, instance_ids: list[int], model_version: str) -> list[Any]:
    """The studies of ``instance_ids``, each with its flag under ``model_version`` (``after``) and
    under its images' previous answers (``before``), over the images ``model_version`` answered."""
    study_ids: set[int] = set()
    for ids in in_chunks(instance_ids):
        study_ids.update(session.scalars(select(Series.study_id).join(Instance, Instance.series_id == Series.id)
                                         .where(Instance.id.in_(ids))))
    new, old = aliased(Prediction), aliased(Prediction)
    previous = (select(Prediction.instance_id, func.max(Prediction.id).label("prediction_id"))
                .where(Prediction.model_version != model_version).group_by(Prediction.instance_id).subquery())
    rows = []
    for chunk in in_chunks(sorted(study_ids)):
        rows += session.execute(
            select(Study.StudyInstanceUID, Study.AccessionNumber, any_image_flagged(old.flagged).label("before"),
                   any_image_flagged(new.flagged).label("after"))
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .join(new, and_(new.instance_id == Instance.id, new.model_version == model_version))
            .outerjoin(previous, previous.c.instance_id == Instance.id)
            .outerjoin(old, old.id == previous.c.prediction_id)
            .where(Study.id.in_(chunk))
            .group_by(Study.id)
        ).all()
    return rows


def model_versions(session: Session) -> dict[str, dict[str, Any]]:
    """Every model version that has answered: version -> name, weights sha256, threshold, first use."""
    return {m.version: {"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256,
                        "threshold": m.threshold, "preprocessing_version": m.preprocessing_version,
                        "first_used_at": iso_utc(m.first_used_at)}
            for m in session.scalars(select(ModelVersion).order_by(ModelVersion.id))}

