"""`pneumoscreen worker` starts itself again when Celery stops on an unrecoverable error.

A queue key of the wrong type in Redis makes the consumer fail with a WRONGTYPE error, which
Celery treats as unrecoverable: a real crash, produced on demand (in the field the same exit
comes from kombu failing while a vanished broker takes unacknowledged messages back).
"""

from __future__ import annotations

import signal

import pytest
import redis

from tests.helpers.processes import Process, cli_env, run_cli, wait_until
from worker.celery_app import app

pytestmark = pytest.mark.slow


@pytest.fixture
def worker_env(tmp_path, redis_url, sqlite_url):
    env = cli_env(database_url=sqlite_url, broker_url=redis_url, data_dir=tmp_path / "data")
    run_cli("db", "upgrade", env=env)
    return env


def _poison(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.set("maintenance", "not a list")  # the queue the worker consumes
    return client


def test_a_crashed_worker_starts_again_in_the_same_process_and_consumes(tmp_path, redis_url, worker_env):
    client = _poison(redis_url)
    proc = Process(["worker", "--queues", "maintenance"], worker_env, tmp_path / "worker.log")
    try:
        wait_until(lambda: proc.log().count("starting it again") >= 2, timeout=60, what="two restarts")
        assert "Unrecoverable error" in proc.log() and proc.proc.poll() is None  # same pid, still running
        client.delete("maintenance")
        wait_until(lambda: "ready." in proc.log(), timeout=60, what="the worker ready")
        app.conf.broker_url = redis_url
        app.send_task("pneumoscreen.reconcile")
        wait_until(lambda: "pneumoscreen.reconcile[" in proc.log() and "succeeded" in proc.log(), timeout=60,
                   what="the task consumed after the restart")
    finally:
        proc.stop()
        client.close()


def test_after_ten_quick_crashes_in_a_row_the_exit_stands(tmp_path, redis_url, worker_env):
    client = _poison(redis_url)
    proc = Process(["worker", "--queues", "maintenance"], {**worker_env, "PNEUMOSCREEN_WORKER_RESTARTS": "10"},
                   tmp_path / "worker.log")
    try:
        assert proc.proc.wait(timeout=60) == 1
        assert "giving up" in proc.log() and "starting it again" not in proc.log()
    finally:
        proc.stop()
        client.close()


def test_a_cold_shutdown_asked_for_by_a_signal_is_not_restarted(tmp_path, worker_env):
    """SIGQUIT makes Celery stop at once; the operator meant it, so the process ends."""
    proc = Process(["worker", "--queues", "maintenance"], worker_env, tmp_path / "worker.log")
    try:
        wait_until(lambda: "ready." in proc.log(), timeout=60, what="the worker ready")
        proc.proc.send_signal(signal.SIGQUIT)
        assert proc.proc.wait(timeout=30) == 0
        assert "starting it again" not in proc.log()
    finally:
        proc.stop()
