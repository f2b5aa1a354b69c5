"""Data functions. Each takes a session and keyword-only arguments and leaves
the commit to the caller (``with Session.begin() as s: ...``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from db.models import TERMINAL_STATES, Instance, InstanceState, Prediction, Series, Study, utcnow


def _upsert(session: Session, table, values: dict[str, Any], *, key: str | list[str],
            update: dict[str, Any] | None = None):
    """INSERT ... ON CONFLICT (key) DO UPDATE/NOTHING ... RETURNING id, on SQLite and PostgreSQL alike."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"database {dialect!r} is not supported (SQLite or PostgreSQL)")
    stmt = insert(table).values(**values)
    keys = [key] if isinstance(key, str) else key
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_=update)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    return session.execute(stmt.returning(table.c.id)).scalar_one_or_none()


def record_received(
    session: Session, *, StudyInstanceUID: str, SeriesInstanceUID: str, SOPInstanceUID: str,
    SOPClassUID: str, TransferSyntaxUID: str, AccessionNumber: str | None, Modality: str | None,
    path: str, size_bytes: int, calling_ae: str | None,
) -> tuple[int, bool]:
    """Record a stored instance; returns ``(instance id, created)``.

    Three statements, safe against concurrent senders of the same study. A SOP
    Instance UID already known is not recorded twice (``created=False``),
    unless the earlier copy could not be parsed: this one then replaces it.
    Either way the study's quiet period restarts.
    """
    now = utcnow()
    study_id = _upsert(
        session, Study.__table__,
        {"study_instance_uid": StudyInstanceUID, "accession_number": AccessionNumber, "received_at": now,
         "last_received_at": now},
        key="study_instance_uid", update={"last_received_at": now},
    )
    series_id = _upsert(
        session, Series.__table__,
        {"series_instance_uid": SeriesInstanceUID, "study_id": study_id, "modality": Modality},
        key="series_instance_uid", update={"series_instance_uid": SeriesInstanceUID},
    )
    values = {"series_id": series_id, "sop_class_uid": SOPClassUID, "transfer_syntax_uid": TransferSyntaxUID,
              "path": path, "size_bytes": size_bytes, "calling_ae": calling_ae,
              "state": InstanceState.RECEIVED, "reason": None, "received_at": now, "updated_at": now}
    instance_id = _upsert(session, Instance.__table__, {"sop_instance_uid": SOPInstanceUID, **values},
                          key="sop_instance_uid")
    if instance_id is not None:
        return instance_id, True
    # known already: replace it only if the earlier copy could not be parsed
    del values["received_at"]
    table = Instance.__table__
    replaced = session.execute(
        update(table).where(table.c.sop_instance_uid == SOPInstanceUID, table.c.series_id.is_(None))
        .values(**values).returning(table.c.id)
    ).scalar_one_or_none()
    if replaced is not None:
        return replaced, True
    existing = session.scalars(select(Instance.id).where(Instance.SOPInstanceUID == SOPInstanceUID)).one()
    return existing, False


def record_unreadable(
    session: Session, *, SOPInstanceUID: str, SOPClassUID: str, TransferSyntaxUID: str, path: str,
    size_bytes: int, calling_ae: str | None, reason: str,
) -> Instance | None:
    """Record a received dataset that could not be parsed as FAILED (its file is quarantined).

    Returns None when the SOP Instance UID is already known (a good copy is never replaced).
    """
    if session.scalars(select(Instance.id).filter_by(SOPInstanceUID=SOPInstanceUID)).first() is not None:
        return None
    now = utcnow()
    instance = Instance(SOPInstanceUID=SOPInstanceUID, SOPClassUID=SOPClassUID, TransferSyntaxUID=TransferSyntaxUID,
                        path=path, size_bytes=size_bytes, calling_ae=calling_ae, state=InstanceState.FAILED,
                        reason=reason, received_at=now, updated_at=now)
    session.add(instance)
    return instance


def claim_quiet_instances(session: Session, *, quiet_since: datetime, limit: int = 500) -> list[int]:
    """Mark RECEIVED instances of studies quiet since ``quiet_since`` as QUEUED; return their ids."""
    stmt = (
        select(Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Instance.state == InstanceState.RECEIVED, Study.last_received_at <= quiet_since)
        .order_by(Instance.id)
        .limit(limit)
    )
    ids = list(session.scalars(stmt))
    if ids:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(ids), Instance.state == InstanceState.RECEIVED)
            .values(state=InstanceState.QUEUED, queued_at=utcnow(), updated_at=utcnow())
        )
    return ids


def stale_instances(session: Session, *, older_than: datetime, limit: int = 500) -> list[tuple[int, InstanceState]]:
    """Instances left QUEUED or PREPROCESSED since before ``older_than`` (lost messages)."""
    stmt = (
        select(Instance.id, Instance.state)
        .where(Instance.state.in_([InstanceState.QUEUED, InstanceState.PREPROCESSED]),
               Instance.updated_at <= older_than)
        .order_by(Instance.id)
        .limit(limit)
    )
    return [(row.id, row.state) for row in session.execute(stmt)]


def touch_instances(session: Session, *, ids: list[int], state: InstanceState) -> None:
    """Move ``ids`` (currently in a non-terminal state) to ``state`` with a fresh timestamp."""
    session.execute(
        update(Instance)
        .where(Instance.id.in_(ids), Instance.state.not_in(TERMINAL_STATES))
        .values(state=state, updated_at=utcnow())
    )


def get_instance(session: Session, *, instance_id: int) -> Instance | None:
    return session.get(Instance, instance_id)


def set_state(session: Session, *, instance_id: int, state: InstanceState, reason: str | None = None,
              path: str | None = None) -> bool:
    """Move an instance to ``state`` (and its file to ``path``) unless it is already terminal; True if it moved."""
    values = {"state": state, "reason": reason, "updated_at": utcnow()}
    if path is not None:
        values["path"] = path
    result = session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.state.not_in(TERMINAL_STATES))
        .values(**values)
    )
    return result.rowcount == 1


def record_prediction(
    session: Session, *, instance_id: int, model_name: str, model_version: str, weights_sha256: str,
    probability: float, threshold: float,
) -> bool:
    """Store a model's answer (once per instance and model version) and mark the instance PREDICTED.

    Returns False when this model version had already answered: a redelivered message
    changes nothing (the first answer stands).
    """
    created = _upsert(
        session, Prediction.__table__,
        {"instance_id": instance_id, "model_version": model_version, "model_name": model_name,
         "weights_sha256": weights_sha256, "probability": probability, "threshold": threshold,
         "flagged": probability >= threshold, "created_at": utcnow()},
        key=["instance_id", "model_version"],
    ) is not None
    session.execute(
        update(Instance).where(Instance.id == instance_id)
        .values(state=InstanceState.PREDICTED, reason=None, updated_at=utcnow())
    )
    return created


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


#: Worklist priority: 1 = flagged (read first), 2 = not yet screened or some
#: image could not be screened (a person must look), 3 = screened, nothing flagged.
PRIORITY_FLAGGED, PRIORITY_PENDING, PRIORITY_ROUTINE = 1, 2, 3


def worklist(session: Session, *, flagged_only: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    """Studies in reading order: flagged first (highest probability first), then
    studies still in progress or with failed images, then the rest, oldest first."""
    flagged = func.max(case((Prediction.flagged, 1), else_=0))
    open_count = func.sum(case((Instance.state.not_in(TERMINAL_STATES), 1), else_=0))
    failed_count = func.sum(case((Instance.state == InstanceState.FAILED, 1), else_=0))
    predicted_count = func.count(Prediction.id)
    max_probability = func.max(Prediction.probability)
    priority = case(
        (flagged == 1, PRIORITY_FLAGGED),
        ((open_count > 0) | (failed_count > 0), PRIORITY_PENDING),
        else_=PRIORITY_ROUTINE,
    )
    stmt = (
        select(
            Study.StudyInstanceUID, Study.AccessionNumber, Study.received_at,
            priority.label("priority"), flagged.label("flagged"), max_probability.label("max_probability"),
            open_count.label("open_count"), failed_count.label("failed_count"),
            predicted_count.label("predicted_count"), func.max(Prediction.model_version).label("model_version"),
        )
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .outerjoin(Prediction, Prediction.instance_id == Instance.id)
        .group_by(Study.id)
        .order_by(priority, max_probability.desc().nulls_last(), Study.received_at)
    )
    if flagged_only:
        stmt = stmt.having(flagged == 1)
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = []
    for r in session.execute(stmt):
        if r.open_count:
            state = "IN_PROGRESS"
        elif r.predicted_count:
            state = "SCREENED"
        elif r.failed_count:
            state = "FAILED"
        else:
            state = "NOT_SCREENED"
        rows.append({
            "study_instance_uid": r.StudyInstanceUID, "accession_number": r.AccessionNumber,
            "priority": int(r.priority), "flagged": bool(r.flagged),
            "max_probability": None if r.max_probability is None else round(float(r.max_probability), 6),
            "state": state, "received_at": _iso(r.received_at), "model_version": r.model_version,
        })
    return rows


def list_instances(session: Session, *, state: InstanceState | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Every received instance with its state, reason and latest probability."""
    latest = (
        select(Prediction.instance_id, func.max(Prediction.id).label("prediction_id"))
        .group_by(Prediction.instance_id).subquery()
    )
    stmt = (
        select(Instance, Series.SeriesInstanceUID, Study.StudyInstanceUID, Prediction.probability,
               Prediction.model_version)
        .outerjoin(Series, Instance.series_id == Series.id)
        .outerjoin(Study, Series.study_id == Study.id)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Prediction, Prediction.id == latest.c.prediction_id)
        .order_by(Instance.id)
    )
    if state is not None:
        stmt = stmt.where(Instance.state == state)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        {
            "sop_instance_uid": inst.SOPInstanceUID, "study_instance_uid": study_uid,
            "series_instance_uid": series_uid, "state": inst.state.value, "reason": inst.reason,
            "probability": None if probability is None else round(float(probability), 6),
            "model_version": model_version,
        }
        for inst, series_uid, study_uid, probability, model_version in session.execute(stmt)
    ]
