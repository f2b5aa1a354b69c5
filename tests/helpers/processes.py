"""Real processes and peers for the tests: free ports, `pneumoscreen` subprocesses with their
logs, dcmtk's storescu, the production topology, waiting for a condition.

PostgreSQL and Redis are expected at ``PNEUMOSCREEN_TEST_POSTGRES`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``) and ``PNEUMOSCREEN_TEST_REDIS``
(default ``redis://127.0.0.1:6379/13``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

PG_ADMIN_URL = os.environ.get("PNEUMOSCREEN_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PNEUMOSCREEN_TEST_REDIS", "redis://127.0.0.1:6379/13")
PNEUMOSCREEN = [sys.executable, "-m", "worker.cli"]
DCMTK = Path("/usr/bin")
"""dcmtk's tools, by full path: pynetdicom installs console scripts of the same names in the venv."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@contextmanager
def flushed_redis(url: str) -> Iterator[str]:
    """The Redis database at ``url``, emptied before and after use."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def cli_env(**settings: str) -> dict[str, str]:
    """The environment for a pneumoscreen process: this one's, less stray PNEUMOSCREEN_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMOSCREEN_")}
    env.update({f"PNEUMOSCREEN_{k.upper()}": str(v) for k, v in settings.items()})
    env["TCP_NODELAY"] = "1"
    return env


def run_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PNEUMOSCREEN, *args], env=env, capture_output=True, text=True, timeout=120,
                          check=check)


def cli_json(*args: str, env: dict[str, str]):
    result = run_cli(*args, "--json", env=env)
    return json.loads(result.stdout)


def wait_until(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout}s (last: {last!r})")


class Process:
    """A pneumoscreen subprocess whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([*PNEUMOSCREEN, *args], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def storescu(port: int, *files: Path, jpeg_as_is: bool = False, aet: str = "STORESCU",
             aec: str = "PNEUMOSCREEN") -> subprocess.CompletedProcess:
    exe = DCMTK / "storescu"
    if not exe.is_file():
        pytest.fail("dcmtk's storescu is not installed (apt-get install dcmtk)")
    args = [str(exe), "-aet", aet, "-aec", aec]
    if jpeg_as_is:
        args.append("-xy")
    args += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})


def start_production(tmp_path: Path, processes: list[Process], *, pg_url: str, redis_url: str,
                     **settings) -> tuple[dict[str, str], int, Process, Process]:
    """The production topology on PostgreSQL and Redis: schema, `listen`, one worker on every queue.

    Returns the environment, the DICOM port, the listener and the worker.
    """
    port = free_port()
    env = cli_env(database_url=pg_url, broker_url=redis_url, data_dir=tmp_path / "data", port=port, **settings)
    run_cli("db", "upgrade", env=env)
    listener = Process(["listen"], env, tmp_path / "listen.log")
    processes.append(listener)
    worker = Process(["worker", "--queues", "preprocess,inference,maintenance"], env, tmp_path / "worker.log")
    processes.append(worker)
    wait_for_port(port, listener.proc)
    return env, port, listener, worker


def start_run(env: dict[str, str], processes: list[Process], log_path: Path, *args: str) -> Process:
    """`pneumoscreen run` (the embedded default) with ``env``, which names its port; kept in
    ``processes`` to be stopped after the test; returns once it listens."""
    runner = Process([*args, "run"], env, log_path)
    processes.append(runner)
    wait_for_port(int(env["PNEUMOSCREEN_PORT"]), runner.proc)
    return runner


@contextmanager
def listening(workdir: Path, broker_url: str, **settings) -> Iterator[tuple[int, Process, Path]]:
    """`pneumoscreen listen` on SQLite in ``workdir/data``, dispatching nothing (the studies stay
    quiet): (DICOM port, the process, the data directory); stopped on leaving."""
    port, data_dir = free_port(), workdir / "data"
    env = cli_env(data_dir=data_dir, broker_url=broker_url, port=port, study_quiet_seconds=86400, **settings)
    run_cli("db", "upgrade", env=env)
    listener = Process(["listen"], env, workdir / "listen.log")
    try:
        wait_for_port(port, listener.proc)
        yield port, listener, data_dir
    finally:
        listener.stop()
