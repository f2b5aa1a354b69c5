"""Results on their way out: one row per (study, model version, destination kind,
destination), claimed by one sender at a time, retried until SENT or FAILED, whatever
the kind (DICOM SR, HL7 v2, FHIR): the senders differ, the row and its states do not.

Session in, caller commits, like every data function here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    OPEN_STATES,
    TERMINAL_STATES,
    DeliveryState,
    Instance,
    InstanceState,
    Prediction,
    ResultDelivery,
    Series,
    Study,
    utcnow,
)
from db.queries import iso_utc, upsert
from db.results import any_image_flagged


def completed_studies(session: Session, *, instance_ids: list[int]) -> list[int]:
    """Ids of the studies of ``instance_ids`` that have no image left in flight."""
    if not instance_ids:
        return []
    studies = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
               .where(Instance.id.in_(instance_ids)).distinct())
    open_studies = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
                    .where(Series.study_id.in_(studies), Instance.state.not_in(TERMINAL_STATES)).distinct())
    return list(session.scalars(select(Study.id).where(Study.id.in_(studies), Study.id.not_in(open_studies))
                                .order_by(Study.id)))


def request_delivery(session: Session, *, study_id: int, model_version: str, destination: str,
                     kind: str = "dicom") -> int:
    """Ask for the study's result to be (re)sent to ``destination`` of ``kind``; returns the delivery id.

    A report already SENT or FAILED goes back to PENDING: the study has new
    results (a late image), or an operator asked again.
    """
    now = utcnow()
    return upsert(
        session, ResultDelivery.__table__,
        {"study_id": study_id, "model_version": model_version, "kind": kind, "destination": destination,
         "state": DeliveryState.PENDING, "attempts": 0, "instance_count": 0, "updated_at": now},
        key=["study_id", "model_version", "kind", "destination"],
        update={"state": DeliveryState.PENDING, "reason": None, "attempts": 0, "updated_at": now},
    )


def claim_delivery(session: Session, *, delivery_id: int, stale_before: datetime) -> bool:
    """PENDING (or SENDING since before ``stale_before``: its sender died) -> SENDING; True if claimed."""
    table = ResultDelivery.__table__
    result = session.execute(
        update(table)
        .where(table.c.id == delivery_id,
               or_(table.c.state == DeliveryState.PENDING,
                   and_(table.c.state == DeliveryState.SENDING, table.c.updated_at < stale_before)))
        .values(state=DeliveryState.SENDING, attempts=table.c.attempts + 1, updated_at=utcnow())
    )
    return result.rowcount == 1


@dataclass(frozen=True)
class ScreenedImage:
    """One screened image of a study, as its report needs it."""

    SOPInstanceUID: str
    path: str
    probability: float
    flagged: bool
    threshold: float
    model_name: str
    weights_sha256: str
    population_note: str | None = None


@dataclass(frozen=True)
class EarlierDelivery:
    """A result of another model version sent to the same destination for the same study: the one a
    new result corrects."""

    model_version: str
    receipt: str | None
    flagged: bool


@dataclass(frozen=True)
class DeliveryJob:
    """A claimed delivery: where it goes and what it reports."""

    id: int
    StudyInstanceUID: str
    model_version: str
    kind: str
    destination: str
    attempts: int
    images: tuple[ScreenedImage, ...]
    AccessionNumber: str | None = None
    #: the results of other model versions SENT to this destination for this study, oldest first
    earlier: tuple[EarlierDelivery, ...] = ()


def _screened_images(session: Session, *, study_id: int, model_version: str) -> list[ScreenedImage]:
    rows = session.execute(
        select(Instance.SOPInstanceUID, Instance.path, Prediction.probability, Prediction.flagged,
               Prediction.threshold, Prediction.model_name, Prediction.weights_sha256, Instance.population_note)
        .join(Series, Instance.series_id == Series.id)
        .join(Prediction, Prediction.instance_id == Instance.id)
        .where(Series.study_id == study_id, Prediction.model_version == model_version)
        .order_by(Instance.id)
    ).all()
    return [ScreenedImage(*row) for row in rows]


def _earlier_deliveries(session: Session, delivery: ResultDelivery) -> tuple[EarlierDelivery, ...]:
    """Other versions' results SENT to the same destination, each with whether it flagged the study."""
    flagged = (select(any_image_flagged(Prediction.flagged))
               .join(Instance, Prediction.instance_id == Instance.id)
               .join(Series, Instance.series_id == Series.id)
               .where(Series.study_id == delivery.study_id, Prediction.model_version == ResultDelivery.model_version)
               .correlate(ResultDelivery).scalar_subquery())
    rows = session.execute(
        select(ResultDelivery.model_version, ResultDelivery.receipt, flagged)
        .where(ResultDelivery.study_id == delivery.study_id, ResultDelivery.kind == delivery.kind,
               ResultDelivery.destination == delivery.destination, ResultDelivery.id != delivery.id,
               ResultDelivery.state == DeliveryState.SENT)
        .order_by(ResultDelivery.updated_at, ResultDelivery.id)
    ).all()
    return tuple(EarlierDelivery(version, receipt, bool(was_flagged)) for version, receipt, was_flagged in rows)


def delivery_job(session: Session, *, delivery_id: int) -> DeliveryJob | None:
    """The delivery, the study's images that its model version screened and what was sent before."""
    row = session.execute(
        select(ResultDelivery, Study.StudyInstanceUID, Study.AccessionNumber)
        .join(Study, ResultDelivery.study_id == Study.id)
        .where(ResultDelivery.id == delivery_id)
    ).one_or_none()
    if row is None:
        return None
    delivery, study_uid, accession = row
    images = _screened_images(session, study_id=delivery.study_id, model_version=delivery.model_version)
    return DeliveryJob(delivery.id, study_uid, delivery.model_version, delivery.kind, delivery.destination,
                       delivery.attempts, tuple(images), AccessionNumber=accession,
                       earlier=_earlier_deliveries(session, delivery))


def finish_delivery(session: Session, *, delivery_id: int, receipt: str, instance_count: int) -> bool:
    """SENDING -> SENT. False if the row moved meanwhile (a newer request made it PENDING again)."""
    result = session.execute(
        update(ResultDelivery)
        .where(ResultDelivery.id == delivery_id, ResultDelivery.state == DeliveryState.SENDING)
        .values(state=DeliveryState.SENT, reason=None, receipt=receipt,
                instance_count=instance_count, updated_at=utcnow())
    )
    return result.rowcount == 1


def release_delivery(session: Session, *, delivery_id: int, reason: str, final: bool) -> None:
    """A failed attempt: back to PENDING for the next retry, or FAILED when ``final``."""
    session.execute(
        update(ResultDelivery)
        .where(ResultDelivery.id == delivery_id, ResultDelivery.state == DeliveryState.SENDING)
        .values(state=DeliveryState.FAILED if final else DeliveryState.PENDING, reason=reason, updated_at=utcnow())
    )


def fail_delivery(session: Session, *, delivery_id: int, reason: str) -> None:
    """Retries spent: FAILED with ``reason`` (unless it was sent meanwhile)."""
    session.execute(
        update(ResultDelivery)
        .where(ResultDelivery.id == delivery_id, ResultDelivery.state != DeliveryState.SENT)
        .values(state=DeliveryState.FAILED, reason=reason, updated_at=utcnow())
    )


def stale_deliveries(session: Session, *, older_than: datetime, limit: int = 500) -> list[int]:
    """Deliveries PENDING or SENDING since before ``older_than`` (a lost message, a dead sender)."""
    return list(session.scalars(
        select(ResultDelivery.id)
        .where(ResultDelivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
               ResultDelivery.updated_at < older_than)
        .order_by(ResultDelivery.id).limit(limit)
    ))


def unreported_studies_statement(*, kind: str = "dicom", destination: str, answered_since: datetime,
                                 answered_before: datetime, limit: int = 500):
    """The query of :func:`unreported_studies`."""
    answered = (
        select(Series.study_id.label("study_id"), Prediction.model_version.label("model_version"),
               func.max(Prediction.created_at).label("latest"))
        .join(Instance, Instance.series_id == Series.id)
        .join(Prediction, Prediction.instance_id == Instance.id)
        .where(Instance.state == InstanceState.PREDICTED, Instance.updated_at >= answered_since,
               Instance.updated_at < answered_before, Prediction.created_at >= answered_since)
        .group_by(Series.study_id, Prediction.model_version)
        .subquery()
    )
    # The studies with an image still on its way, as one set the query builds once (a hashed
    # NOT IN): a correlated EXISTS let a planner without column statistics, which takes the day's
    # answers for one row, rescan the whole instance table for each of them (minutes at 50,000 a day).
    open_studies = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
                    .where(Instance.state.in_(OPEN_STATES)))
    asked = (exists().where(ResultDelivery.study_id == answered.c.study_id,
                            ResultDelivery.model_version == answered.c.model_version,
                            ResultDelivery.kind == kind, ResultDelivery.destination == destination,
                            or_(ResultDelivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
                                ResultDelivery.updated_at >= answered.c.latest)))
    return (select(answered.c.study_id, answered.c.model_version)
            .where(answered.c.study_id.not_in(open_studies), ~asked)
            .order_by(answered.c.study_id, answered.c.model_version).limit(limit))


def unreported_studies(session: Session, *, kind: str = "dicom", destination: str, answered_since: datetime,
                       answered_before: datetime, limit: int = 500) -> list[tuple[int, str]]:
    """(study id, model version) of the studies answered between ``answered_since`` and
    ``answered_before`` whose report to ``destination`` was never asked for after their latest
    answer: every image has ended, and no delivery of that version is on its way or was
    (re)requested since. A worker that died between recording a batch's answers and asking for
    the reports leaves exactly these; the reconciler asks for them."""
    rows = session.execute(unreported_studies_statement(kind=kind, destination=destination,
                                                        answered_since=answered_since,
                                                        answered_before=answered_before, limit=limit))
    return [(study_id, version) for study_id, version in rows]


def delivery_counts(session: Session) -> dict[str, int]:
    """How many deliveries are in each state."""
    rows = session.execute(select(ResultDelivery.state, func.count()).group_by(ResultDelivery.state)).all()
    return {state.value: count for state, count in rows}


def list_deliveries(session: Session, *, study_instance_uid: str | None = None, state: DeliveryState | None = None,
               limit: int = 50) -> list[dict[str, Any]]:
    """Deliveries of results (every kind), newest first: of one study, or in one state."""
    stmt = (select(ResultDelivery, Study.StudyInstanceUID, Study.AccessionNumber)
            .join(Study, ResultDelivery.study_id == Study.id)
            .order_by(ResultDelivery.updated_at.desc(), ResultDelivery.id.desc()).limit(limit))
    if study_instance_uid is not None:
        stmt = stmt.where(Study.StudyInstanceUID == study_instance_uid)
    if state is not None:
        stmt = stmt.where(ResultDelivery.state == state)
    return [{"study_instance_uid": study_uid, "accession_number": accession, "model_version": d.model_version,
             "kind": d.kind, "destination": d.destination, "state": d.state.value, "attempts": d.attempts, "reason": d.reason,
             "receipt": d.receipt, "instance_count": d.instance_count,
             "updated_at": iso_utc(d.updated_at)}
            for d, study_uid, accession in session.execute(stmt)]
