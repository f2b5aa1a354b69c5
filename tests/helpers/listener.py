"""The listener in the test's own process, on a free port, over a database of the test's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from db.models import Instance
from db.session import make_engine, make_sessionmaker
from dicom_io.server import start_listener
from dicom_io.spool import Spool
from tests.helpers.processes import free_port
from worker.runtime import listener_config
from worker.settings import Settings


class Listener:
    """``start_listener`` as ``pneumoscreen listen`` configures it (the settings' defaults), with
    ``listener_kwargs`` on top (``ListenerConfig`` fields)."""

    def __init__(self, tmp_path: Path, database_url: str, *, spool_root: Path | None = None,
                 min_free_bytes: int = 0, allowed_aes=(), **listener_kwargs) -> None:
        self.port = free_port()
        self.database_url = database_url
        self.engine = make_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = Spool(spool_root or tmp_path / "spool", quarantine_root=tmp_path / "quarantine",
                           min_free_bytes=min_free_bytes)
        config = replace(listener_config(Settings(_env_file=None)), port=self.port,
                         allowed_aes=frozenset(allowed_aes), **listener_kwargs)
        self.server = start_listener(config, spool=self.spool, sessions=self.sessions)

    def instances(self) -> list[Instance]:
        with self.sessions() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def close(self) -> None:
        self.server.shutdown()
        self.engine.dispose()
