"""Databases and servers of one test or run: a scratch PostgreSQL database, dropped afterwards;
private Redis and PostgreSQL servers on free ports, for tests that stop and restart them."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from tests.helpers.processes import free_port, wait_for_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


@contextmanager
def scratch_database(admin_url: str, *, prefix: str = "pneumoscreen_test") -> Iterator[str]:
    """A new PostgreSQL database on the server of ``admin_url``, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, timeout=20)
        redis.Redis(port=self.port).ping()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class PrivatePostgres:
    """A throw-away cluster (initdb as the postgres user; trust auth on 127.0.0.1)."""

    def __init__(self) -> None:
        if PG_BIN is None:
            raise RuntimeError("PostgreSQL server binaries are needed (apt-get install postgresql)")
        self.port = free_port()
        # outside pytest's private tmp folders, which the postgres user cannot enter
        self.workdir = Path(tempfile.mkdtemp(prefix="pneumoscreen-pg-"))
        shutil.chown(self.workdir, "postgres")
        self._as_postgres(PG_BIN / "initdb", "-D", str(self.workdir / "data"), "-A", "trust", "-U", "postgres")
        self.start()

    @staticmethod
    def _as_postgres(*args) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, args)], check=True, capture_output=True,
                       timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.workdir / "data", "-l", self.workdir / "log", "-w", "-o",
                          f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.workdir / "data", "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        time.sleep(0.1)
        shutil.rmtree(self.workdir, ignore_errors=True)
