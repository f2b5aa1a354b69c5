"""Engine and session factory: made once per process, from a database URL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # a database host that does not answer must fail a request (and /healthz) in seconds, not hang
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


IN_CLAUSE_CHUNK = 500
"""Ids per ``IN (...)`` list: well below every backend's limit on bound parameters."""


def in_chunks(ids: Sequence[int], size: int = IN_CLAUSE_CHUNK) -> Iterator[Sequence[int]]:
    """``ids`` in slices of at most ``size``, one ``IN (...)`` query each."""
    for start in range(0, len(ids), size):
        yield ids[start:start + size]
