"""Data functions. Each takes a session and keyword-only arguments and leaves
the commit to the caller (``with Session.begin() as s: ...``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    MAX_NOTE,
    TERMINAL_STATES,
    Instance,
    InstanceState,
    ModelVersion,
    Prediction,
    Series,
    Study,
    utcnow,
)


def _insert(session: Session, table):
    """The dialect's INSERT (it knows ON CONFLICT): SQLite or PostgreSQL."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"database {dialect!r} is not supported (SQLite or PostgreSQL)")
    return insert(table)


def upsert(session: Session, table, values: dict[str, Any], *, key: str | list[str],
           update: dict[str, Any] | None = None):
    """INSERT ... ON CONFLICT (key) DO UPDATE/NOTHING ... RETURNING id, on SQLite and PostgreSQL alike."""
    stmt = _insert(session, table).values(**values)
    keys = [key] if isinstance(key, str) else key
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_=update)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    return session.execute(stmt.returning(table.c.id)).scalar_one_or_none()


def _dicom_date(value: str | None) -> str | None:
    """A DICOM DA (YYYYMMDD) or None: anything else is not worth keeping for date queries."""
    value = (value or "").strip().replace(".", "")
    return value if len(value) == 8 and value.isdigit() else None


def record_received(
    session: Session, *, StudyInstanceUID: str, SeriesInstanceUID: str, SOPInstanceUID: str,
    SOPClassUID: str, TransferSyntaxUID: str, AccessionNumber: str | None, Modality: str | None,
    path: str, size_bytes: int, calling_ae: str | None, StudyDate: str | None = None,
) -> tuple[int, bool]:
    """Record a stored instance; returns ``(instance id, created)``.

    Three statements, safe against concurrent senders of the same study. A SOP
    Instance UID already known is not recorded twice (``created=False``),
    unless the earlier copy could not be parsed: this one then replaces it.
    Either way the study's quiet period restarts.
    """
    now = utcnow()
    study_id = upsert(
        session, Study.__table__,
        {"study_instance_uid": StudyInstanceUID, "accession_number": AccessionNumber,
         "study_date": _dicom_date(StudyDate), "received_at": now, "last_received_at": now},
        key="study_instance_uid", update={"last_received_at": now},
    )
    series_id = upsert(
        session, Series.__table__,
        {"series_instance_uid": SeriesInstanceUID, "study_id": study_id, "modality": Modality},
        key="series_instance_uid", update={"series_instance_uid": SeriesInstanceUID},
    )
    values = {"series_id": series_id, "sop_class_uid": SOPClassUID, "transfer_syntax_uid": TransferSyntaxUID,
              "path": path, "size_bytes": size_bytes, "calling_ae": calling_ae,
              "state": InstanceState.RECEIVED, "reason": None, "received_at": now, "updated_at": now}
    instance_id = upsert(session, Instance.__table__, {"sop_instance_uid": SOPInstanceUID, **values},
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
        .with_for_update(of=Instance, skip_locked=True)  # a concurrent round claims the others, not these
    )
    ids = list(session.scalars(stmt))
    if ids:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(ids), Instance.state == InstanceState.RECEIVED)
            .values(state=InstanceState.QUEUED, queued_at=utcnow(), updated_at=utcnow())
        )
    return ids


def stale_instances(session: Session, *, older_than: datetime, sent_before: dict[InstanceState, datetime] | None = None,
                    limit: int = 500) -> list[tuple[int, InstanceState]]:
    """Instances left QUEUED or PREPROCESSED since before ``older_than`` (lost messages), locked
    until the session ends (PostgreSQL; rows another session holds are skipped).

    ``sent_before``: per state, a time before which its messages can no longer be waiting in their
    queue (the oldest message still waiting there was sent later); an instance sent after it may
    only be behind a backlog, and is left alone.
    """
    limits = {state: min(older_than, (sent_before or {}).get(state, older_than))
              for state in (InstanceState.QUEUED, InstanceState.PREPROCESSED)}
    stmt = (
        select(Instance.id, Instance.state)
        .where(or_(*(and_(Instance.state == state, Instance.updated_at <= limit_at)
                     for state, limit_at in limits.items())))
        .order_by(Instance.id)
        .limit(limit)
        .with_for_update(skip_locked=True)  # two reconcilers at once do not both send the same instance
    )
    return [(row.id, row.state) for row in session.execute(stmt)]


def touch_instances(session: Session, *, ids: list[int], state: InstanceState,
                    notes: Mapping[int, str | None] | None = None) -> None:
    """Move ``ids`` (currently in a non-terminal state) to ``state`` with a fresh timestamp. With
    ``notes``, each one's population note becomes its entry there (none when it has none): one
    statement per distinct note, of which a batch has few."""
    now = utcnow()
    groups: dict[str | None, list[int]] = {}
    for instance_id in ids:
        groups.setdefault(notes.get(instance_id) if notes is not None else None, []).append(instance_id)
    for note, group in groups.items():
        values = {"state": state, "updated_at": now}
        if notes is not None:
            values["population_note"] = note[:MAX_NOTE] if note else None
        session.execute(
            update(Instance)
            .where(Instance.id.in_(group), Instance.state.not_in(TERMINAL_STATES))
            .values(**values)
        )


def paths_and_states(session: Session, *, ids: list[int]) -> dict[int, tuple[str, InstanceState]]:
    """The spool path and state of each of ``ids`` that is in the database."""
    rows = session.execute(select(Instance.id, Instance.path, Instance.state).where(Instance.id.in_(ids)))
    return {row.id: (row.path, row.state) for row in rows}


def set_state(session: Session, *, instance_id: int, state: InstanceState, reason: str | None = None,
              path: str | None = None) -> bool:
    """Move an instance to ``state`` (and its file to ``path``) unless it is already terminal; True if it moved.
    SKIPPED or FAILED, it loses any population note (of an earlier screening): it has no result to qualify."""
    values = {"state": state, "reason": reason, "updated_at": utcnow()}
    if state in (InstanceState.SKIPPED, InstanceState.FAILED):
        values["population_note"] = None
    if path is not None:
        values["path"] = path
    instances = Instance.__table__  # a Core UPDATE: the ORM-enabled one costs far more CPU, twice per image
    result = session.execute(
        update(instances)
        .where(instances.c.id == instance_id, instances.c.state.not_in(TERMINAL_STATES))
        .values(**values)
    )
    return result.rowcount == 1


def record_predictions(
    session: Session, *, model_name: str, model_version: str, weights_sha256: str, threshold: float,
    results: list[tuple[int, float, bool]],
) -> set[int]:
    """Store a model's answers, (instance id, probability, flagged) each, once per instance and
    model version, and mark the instances PREDICTED: two statements for the whole batch. Whether a
    probability is flagged is the model card's rule (``ModelCard.flags``), decided by the caller.

    Returns the ids answered for the first time; for the others this model version had already
    answered, and a redelivered message changes nothing (the first answer stands).
    """
    if not results:
        return set()
    now = utcnow()
    table = Prediction.__table__
    rows = [{"instance_id": instance_id, "model_version": model_version, "model_name": model_name,
             "weights_sha256": weights_sha256, "probability": float(probability), "threshold": threshold,
             "flagged": bool(flagged), "created_at": now} for instance_id, probability, flagged in results]
    stmt = (_insert(session, table).on_conflict_do_nothing(index_elements=["instance_id", "model_version"])
            .returning(table.c.instance_id))
    created = set(session.execute(stmt, rows).scalars())
    instances = Instance.__table__
    session.execute(update(instances).where(instances.c.id.in_([instance_id for instance_id, _, _ in results]))
                    .values(state=InstanceState.PREDICTED, reason=None, updated_at=now))
    return created


def register_model(session: Session, *, name: str, version: str, weights_sha256: str, threshold: float,
                   preprocessing_version: str | None, card_json: str) -> None:
    """Remember a model version the first time it answers (later calls change nothing)."""
    upsert(session, ModelVersion.__table__,
            {"name": name, "version": version, "weights_sha256": weights_sha256, "threshold": threshold,
             "preprocessing_version": preprocessing_version, "card": card_json, "first_used_at": utcnow()},
            key="version")


def requeue_for_model(session: Session, *, model_version: str, received_since: datetime | None = None,
                      received_until: datetime | None = None, limit: int | None = None,
                      skipped_before: datetime | None = None) -> list[int]:
    """Mark PREDICTED instances that ``model_version`` has not yet answered QUEUED again; return their ids.

    The rescreening of an archive: each id must then be sent to ``preprocess``.
    Instances received in [``received_since``, ``received_until``) only, when given. With
    ``skipped_before``, also the instances that ended SKIPPED before that time (to be judged again
    with the current settings; one skipped again during this rescreen is not taken twice).
    """
    answered = select(Prediction.instance_id).where(Prediction.model_version == model_version)
    wanted = and_(Instance.state == InstanceState.PREDICTED, Instance.id.not_in(answered))
    if skipped_before is not None:
        wanted = or_(wanted, and_(Instance.state == InstanceState.SKIPPED, Instance.updated_at < skipped_before))
    stmt = select(Instance.id).where(wanted).order_by(Instance.id)
    if received_since is not None:
        stmt = stmt.where(Instance.received_at >= received_since)
    if received_until is not None:
        stmt = stmt.where(Instance.received_at < received_until)
    if limit is not None:
        stmt = stmt.limit(limit)
    ids = list(session.scalars(stmt))
    if ids:
        now = utcnow()
        session.execute(
            update(Instance)
            .where(Instance.id.in_(ids), Instance.state.in_([InstanceState.PREDICTED, InstanceState.SKIPPED]))
            .values(state=InstanceState.QUEUED, queued_at=now, updated_at=now, reason=None)
        )
    return ids


def iso_utc(value: datetime | None) -> str | None:
    """A stored time as ISO 8601 with its UTC offset (SQLite hands times back without one)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


MAX_REASON = 500
"""A reason is cut to this many characters: one built from what a peer sent (a parser's message
quoting its bytes) could otherwise be as long as the file."""


def bounded_reason(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON] + " [...]"
