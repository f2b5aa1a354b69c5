"""`pneumoscreen worker` starts itself again when Celery stops on an unrecoverable error.

The crash itself (kombu failing while it gives unacknowledged messages back to a broker
that has just gone away) cannot be produced on demand; tests/test_faults.py meets it now and
then. Here the decision is checked with the exec and the sleep recorded instead of done.
"""

from __future__ import annotations

import pytest

from worker import cli


@pytest.fixture
def recorded(monkeypatch):
    calls: dict[str, list] = {"exec": [], "sleep": []}
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls["exec"].append((path, argv)))
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: calls["sleep"].append(seconds))
    monkeypatch.delenv(cli._RESTARTS_ENV, raising=False)
    return calls


def test_a_crash_restarts_the_same_command_with_a_growing_back_off(recorded, monkeypatch):
    for _ in range(3):
        cli._restart_after_crash(1, ran_seconds=2.0)
    assert recorded["sleep"] == [1.0, 2.0, 4.0]
    assert all(argv == cli.sys.orig_argv for _, argv in recorded["exec"]) and len(recorded["exec"]) == 3
    assert cli.os.environ[cli._RESTARTS_ENV] == "3"


def test_a_worker_that_ran_for_a_while_starts_counting_again(recorded, monkeypatch):
    monkeypatch.setenv(cli._RESTARTS_ENV, "9")
    cli._restart_after_crash(1, ran_seconds=3600.0)
    assert recorded["sleep"] == [1.0]


def test_too_many_quick_crashes_in_a_row_leave_the_exit_to_the_supervisor(recorded, monkeypatch, caplog):
    monkeypatch.setenv(cli._RESTARTS_ENV, "10")
    cli._restart_after_crash(1, ran_seconds=2.0)
    assert recorded["exec"] == [] and "giving up" in caplog.text


def test_a_cold_shutdown_asked_for_by_a_signal_is_not_restarted(tmp_path, redis_url):
    """SIGQUIT makes Celery stop at once; the operator meant it, so the process ends."""
    import signal

    from conftest import Process, cli_env, run_cli, wait_until

    env = cli_env(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", broker_url=redis_url,
                  data_dir=tmp_path / "data")
    run_cli("db", "upgrade", env=env)
    proc = Process(["worker", "--queues", "maintenance"], env, tmp_path / "worker.log")
    try:
        wait_until(lambda: "ready." in proc.log(), timeout=60, what="the worker ready")
        proc.proc.send_signal(signal.SIGQUIT)
        proc.proc.wait(timeout=30)
        assert "starting it again" not in proc.log()
    finally:
        proc.stop()
