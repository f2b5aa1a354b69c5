"""Schema migrations (Alembic), run programmatically: ``pneumoscreen db upgrade``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creates the schema on a new database)."""
    command.upgrade(alembic_config(url), revision)


def head_revisions(url: str) -> set[str]:
    """The newest migration(s) this installation has."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config(url)).get_heads())


def applied_revisions(connection) -> set[str]:
    """The migration(s) the database on ``connection`` is at."""
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(connection).get_current_heads())


def is_current(url: str) -> bool:
    """True if the database at ``url`` is at the newest migration."""
    from db.session import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return applied_revisions(connection) == head_revisions(url)
    finally:
        engine.dispose()
