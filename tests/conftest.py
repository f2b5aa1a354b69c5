"""Shared fixtures: a fresh PostgreSQL database, a flushed Redis db, an upgraded SQLite
database and its sessions, the pneumoscreen processes a test started (stopped after it).

Each test gets its own database (dropped afterwards); the Redis db is flushed before and
after use. Helpers that are not fixtures live in ``tests.helpers``.

pydicom validates strictly for the whole session, as highdicom's own tests do: a value invalid for
its VR raises when it is read or written (the product must never write one). A test that makes or
reads invalid values on purpose (a hostile peer, a fuzzer, a source film with an invalid value)
takes the ``invalid_dicom_allowed`` fixture and says why.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config as pydicom_config

from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from tests.helpers.processes import PG_ADMIN_URL, REDIS_URL, Process, flushed_redis, start_production
from tests.helpers.services import scratch_database

pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE


@pytest.fixture
def invalid_dicom_allowed(monkeypatch) -> None:
    """pydicom warns instead of raising on a value invalid for its VR, in this test only."""
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.WARN)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test."""
    with scratch_database(PG_ADMIN_URL) as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    with flushed_redis(REDIS_URL) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pneumoscreen.db'}"


@pytest.fixture
def database_url(sqlite_url) -> str:
    """An upgraded database; a module that needs PostgreSQL too overrides this fixture."""
    upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request, sqlite_url) -> str:
    """An upgraded database on each backend in turn; a module runs on both with
    ``database_url`` overridden to return this one."""
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    return url


@pytest.fixture
def sessions(database_url):
    """The session factory of ``database_url``."""
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def production(tmp_path, processes, pg_url, redis_url):
    """``production(**settings)`` starts the production topology on this test's PostgreSQL database and
    Redis db (``tests.helpers.processes.start_production``): (env, DICOM port, listener, worker)."""
    return functools.partial(start_production, tmp_path, processes, pg_url=pg_url, redis_url=redis_url)
