"""Settings are validated at start-up with messages that say what to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.helpers.processes import cli_env, run_cli
from worker.settings import Settings


def test_defaults_match_the_design():
    s = Settings(_env_file=None)
    assert (s.host, s.port, s.ae_title, s.study_quiet_seconds) == ("127.0.0.1", 11112, "PNEUMOSCREEN", 10.0)
    assert s.effective_database_url.startswith("sqlite:///") and s.effective_database_url.endswith("pneumoscreen.db")
    from worker.runtime import eligibility_policy, listener_config

    policy = eligibility_policy(s)
    assert policy.modalities == {"CR", "DX"} and policy.min_side == 128
    assert policy.chest_body_parts == {"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "CXR", "PORTABLE CHEST"}
    assert s.intended_population == "card" and not policy.screen_any_age
    assert (policy.population.min_age_years, policy.population.max_age_years) == (1, 5)
    config = listener_config(s)
    assert (config.host, config.port, config.ae_title, config.max_pdu_size) == ("127.0.0.1", 11112, "PNEUMOSCREEN",
                                                                                  262144)
    assert (config.artim_timeout, config.max_pending_connections, config.max_dataset_bytes) == (5.0, 64, 2048 << 20)


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("PNEUMOSCREEN_PORT", "4242")
    monkeypatch.setenv("PNEUMOSCREEN_ALLOWED_AES", "PACS1, PACS2")
    s = Settings()
    assert s.port == 4242 and s.allowed_ae_titles == {"PACS1", "PACS2"}


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 0}, "greater than or equal to 1"),
    ({"ae_title": "THIS_AE_TITLE_IS_TOO_LONG"}, "not a valid AE title"),
    ({"host": "0.0.0.0"}, "PNEUMOSCREEN_ALLOWED_AES"),
    ({"database_url": "not a url"}, "not a database URL"),
    ({"results_destination": "PACS"}, "AET@host:port"),
    ({"intended_population": "adults"}, "'card' or 'any'"),
])
def test_bad_values_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**kwargs)


@pytest.mark.slow
def test_cli_refuses_to_start_on_bad_settings():
    result = run_cli("instances", env=cli_env(port="99999"), check=False)
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "port" in result.stderr


@pytest.mark.slow
def test_run_refuses_to_start_without_a_valid_model(tmp_path):
    (tmp_path / "model").mkdir()
    result = run_cli("run", "--data-dir", str(tmp_path / "data"), "--port", "11",
                     env=cli_env(model_dir=tmp_path / "model"), check=False)
    assert result.returncode == 1
    assert "model artifact" in result.stderr and "model.keras" in result.stderr


def test_eligibility_policy_follows_the_settings(monkeypatch):
    from tests.helpers.dicom_factory import PNEUMONIA_JPEG, chest_dataset
    from worker import runtime

    monkeypatch.setenv("PNEUMOSCREEN_ELIGIBLE_MODALITIES", "DX")
    monkeypatch.setenv("PNEUMOSCREEN_MIN_IMAGE_SIDE", "300")
    monkeypatch.setenv("PNEUMOSCREEN_INTENDED_POPULATION", "any")
    runtime.configure(Settings())
    try:
        policy = runtime.eligibility_policy()
        verdict = policy.judge(chest_dataset(PNEUMONIA_JPEG, modality="CR"))
        assert not verdict.eligible and "DX only" in verdict.reason
        verdict = policy.judge(chest_dataset(PNEUMONIA_JPEG, modality="DX"))
        assert not verdict.eligible and "smaller than 300" in verdict.reason
        assert policy.screen_any_age
    finally:
        runtime.configure(Settings())


@pytest.mark.slow
def test_a_busy_port_is_a_clear_error_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "--data-dir", str(tmp_path / "data"), "--port", str(port), env=cli_env(), check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_beat_rescreens_the_archive_nightly_at_the_configured_time_and_zone():
    from worker.celery_app import configure_app

    schedule = configure_app(Settings()).conf.beat_schedule
    nightly = schedule["rescreen-archive"]
    assert nightly["task"] == "pneumoscreen.rescreen_archive"
    assert (nightly["schedule"].hour, nightly["schedule"].minute) == ({1}, {0})
    assert schedule["reconcile"]["task"] == "pneumoscreen.reconcile"

    app = configure_app(Settings(rescreen_schedule="23:45", timezone="Europe/Berlin"))
    nightly = app.conf.beat_schedule["rescreen-archive"]
    assert (nightly["schedule"].hour, nightly["schedule"].minute) == ({23}, {45})
    assert app.conf.timezone == "Europe/Berlin"

    assert "rescreen-archive" not in configure_app(Settings(rescreen_schedule="")).conf.beat_schedule
    for bad in ({"rescreen_schedule": "1 am"}, {"rescreen_schedule": "24:00"}, {"timezone": "Mars/Olympus"}):
        with pytest.raises(ValidationError):
            Settings(**bad)
    configure_app(Settings())
