"""The audit log: who queried which results, when, from where, and what they got.

Session in, caller commits, like every data function here. An actor names a
person or system by a fingerprint ("api:<sha256 prefix>", "cli:<os user>"),
never by a secret.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditEntry, utcnow

_ACTOR_MAX, _CLIENT_MAX, _ACTION_MAX = 128, 64, 256


def _utc(value: datetime) -> datetime:
    """Aware datetimes in UTC (SQLite stores the wall time as given); naive ones are taken as UTC."""
    return value.astimezone(timezone.utc) if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def record_audit(session: Session, *, actor: str, client: str | None, action: str, params: dict[str, Any] | None,
                 status: int, result_count: int | None) -> None:
    """Add one audit entry: ``actor`` asked for ``action`` with ``params`` and got ``status``
    (and ``result_count`` rows, when the answer was a list)."""
    if not actor or len(actor) > _ACTOR_MAX:
        raise ValueError(f"actor must be 1-{_ACTOR_MAX} characters, got {len(actor)}")
    if client is not None and len(client) > _CLIENT_MAX:
        raise ValueError(f"client must be at most {_CLIENT_MAX} characters, got {len(client)}")
    if not action or len(action) > _ACTION_MAX:
        raise ValueError(f"action must be 1-{_ACTION_MAX} characters, got {len(action)}")
    if not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code (100-599), got {status}")
    if result_count is not None and result_count < 0:
        raise ValueError(f"result_count must not be negative, got {result_count}")
    session.add(AuditEntry(
        at=utcnow(), actor=actor, client=client, action=action,
        params=None if params is None else json.dumps(params, sort_keys=True, default=str),
        status=status, result_count=result_count,
    ))


def recent_audit(session: Session, *, limit: int = 100, since: datetime | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries (at or after ``since``, when given), newest first."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    stmt = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
    if since is not None:
        stmt = stmt.where(AuditEntry.at >= _utc(since))
    return [
        {
            "id": entry.id, "at": _utc(entry.at).isoformat(), "actor": entry.actor, "client": entry.client,
            "action": entry.action, "params": None if entry.params is None else json.loads(entry.params),
            "status": entry.status, "result_count": entry.result_count,
        }
        for entry in session.scalars(stmt)
    ]
