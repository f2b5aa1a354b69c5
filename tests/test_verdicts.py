"""Verdicts: every change kept with who and when, a radiologist's verdict winning over one from the
RIS's final report, the current one and the history in the study's JSON, and the labelled studies
(their screened films) that calibration takes. The API runs in this process over SQLite."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from db.accounts import add_account, set_password
from db.models import InstanceState
from db.queries import set_state
from db.verdicts import Finding, UnknownStudy, VerdictSource, labelled_studies, record_verdict, study_verdicts, verdict_counts
from tests.helpers.records import answer, receive
from worker.settings import Settings

SHARED_TOKEN = "5d2a8c4e6f1b3a7092c4e6a8b0d2f416"
UID = "1.2.826.0.1.3680043.10.31.2"
FLAGGED, ROUTINE, UNSCREENED = f"{UID}.1", f"{UID}.2", f"{UID}.3"


def test_a_radiologist_wins_over_a_report_and_every_change_is_kept(sessions):
    with sessions.begin() as s:
        receive(s, FLAGGED, f"{FLAGGED}.1.1")
        account, _ = add_account(s, name="dr.fo", role="radiologist")
        record_verdict(s, study_instance_uid=FLAGGED, finding="normal", source=VerdictSource.RIS_REPORT,
                       actor="ris:RIS", reference="MSG0001")
        assert study_verdicts(s, study_instance_uid=FLAGGED)["verdict"]["finding"] == "normal"
        record_verdict(s, study_instance_uid=FLAGGED, finding="pneumonia", source="radiologist",
                       actor="user:dr.fo", account=account)
        record_verdict(s, study_instance_uid=FLAGGED, finding="normal", source=VerdictSource.RIS_REPORT,
                       actor="ris:RIS", reference="MSG0002")  # a later report does not overrule the radiologist
    with sessions() as s:
        verdicts = study_verdicts(s, study_instance_uid=FLAGGED)
        assert verdicts["verdict"]["finding"] == "pneumonia" and verdicts["verdict"]["actor"] == "user:dr.fo"
        assert [(v["finding"], v["source"], v["reference"]) for v in verdicts["verdicts"]] == [
            ("normal", "ris-report", "MSG0001"), ("pneumonia", "radiologist", None), ("normal", "ris-report", "MSG0002")]
        assert all(v["recorded_at"].endswith("+00:00") for v in verdicts["verdicts"])
        assert verdict_counts(s) == {"studies": 1, "pneumonia": 1, "normal": 0, "recorded": 3}
    with sessions.begin() as s, pytest.raises(UnknownStudy):
        record_verdict(s, study_instance_uid="1.2.3.4.5", finding="normal", source="radiologist", actor="user:x")
    with pytest.raises(ValueError):
        Finding("maybe")


def test_labelled_studies_are_those_with_a_verdict_and_screened_films(sessions):
    with sessions.begin() as s:
        flagged = [receive(s, FLAGGED, f"{FLAGGED}.1.{n}", path=f"/spool/f{n}.dcm")[0] for n in (1, 2)]
        routine = receive(s, ROUTINE, f"{ROUTINE}.1.1", path="/spool/r1.dcm")[0]
        lateral = receive(s, ROUTINE, f"{ROUTINE}.1.2", path="/spool/r2.dcm")[0]
        receive(s, UNSCREENED, f"{UNSCREENED}.1.1")
        answer(s, [(flagged[0], 0.9), (flagged[1], 0.7), (routine, 0.1)])
        for instance_id in (*flagged, routine):
            set_state(s, instance_id=instance_id, state=InstanceState.PREDICTED)
        set_state(s, instance_id=lateral, state=InstanceState.SKIPPED, reason="lateral view")
        for uid, finding in ((FLAGGED, "pneumonia"), (ROUTINE, "normal"), (UNSCREENED, "normal")):
            record_verdict(s, study_instance_uid=uid, finding=finding, source="radiologist", actor="api:test")
    with sessions() as s:
        assert labelled_studies(s) == [
            {"study_instance_uid": FLAGGED, "label": 1, "films": ["/spool/f1.dcm", "/spool/f2.dcm"]},
            {"study_instance_uid": ROUTINE, "label": 0, "films": ["/spool/r1.dcm"]},
        ]


def test_the_verdict_api_records_changes_and_the_study_json_shows_them(monkeypatch, tmp_path, database_url,
                                                                       sessions):
    from worker.api.app import create_app

    monkeypatch.setenv("PNEUMOSCREEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PNEUMOSCREEN_DATABASE_URL", database_url)
    monkeypatch.setenv("PNEUMOSCREEN_API_TOKEN", SHARED_TOKEN)
    with sessions.begin() as s:
        receive(s, FLAGGED, f"{FLAGGED}.1.1")
        _, token = add_account(s, name="dr.gu", role="radiologist")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(Settings())) as api:
        assert api.get(f"/studies/{FLAGGED}", headers=headers).json()["verdict"] is None
        first = api.post(f"/studies/{FLAGGED}/verdict", json={"finding": "pneumonia"}, headers=headers)
        assert first.status_code == 200 and first.json()["verdict"]["finding"] == "pneumonia"
        api.post(f"/studies/{FLAGGED}/verdict", json={"finding": "normal"}, headers=headers)
        study = api.get(f"/studies/{FLAGGED}", headers=headers).json()
        assert study["verdict"]["finding"] == "normal" and study["verdict"]["actor"] == "user:dr.gu"
        assert [v["finding"] for v in study["verdicts"]] == ["pneumonia", "normal"]
        assert api.post(f"/studies/{FLAGGED}/verdict", json={"finding": "maybe"}, headers=headers).status_code == 422
        assert api.post(f"/studies/{FLAGGED}/verdict", json={"finding": "normal", "x": 1},
                        headers=headers).status_code == 422
        assert api.post(f"/studies/{UID}.9/verdict", json={"finding": "normal"}, headers=headers).status_code == 404


@pytest.mark.slow
def test_in_a_real_browser_a_radiologist_records_and_changes_a_verdict_and_an_operator_cannot(tmp_path, processes):
    """`pneumoscreen api` in its own process, Chromium signing in with a name and a password."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from tests.helpers.processes import Process, cli_env, free_port, wait_for_port
    from tests.test_web import _chromium

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite:///{(data_dir / 'pneumoscreen.db').resolve()}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        answer(s, [(receive(s, FLAGGED, f"{FLAGGED}.1.1", accession="PNEU9")[0], 0.93)])
        for name, role in (("dr.hu", "radiologist"), ("op.iv", "operator")):
            add_account(s, name=name, role=role)
            set_password(s, name=name, password=f"{name} reads films")
    port = free_port()
    api = Process(["api"], cli_env(data_dir=data_dir, api_token=SHARED_TOKEN, api_port=port), tmp_path / "api.log")
    processes.append(api)
    wait_for_port(port, api.proc)
    browser = _chromium()
    from selenium.common.exceptions import StaleElementReferenceException

    # the page reloads after each verdict: an element read while it reloads is stale, and read again
    wait = WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException])

    def sign_in(name: str) -> None:
        browser.delete_all_cookies()
        browser.get(f"http://127.0.0.1:{port}/web/studies/{FLAGGED}")
        wait.until(seen.url_contains("/web/login"))
        browser.find_element(By.ID, "name").send_keys(name)
        browser.find_element(By.ID, "token").send_keys(f"{name} reads films")
        browser.find_element(By.CSS_SELECTOR, "form[action='/web/login'] button").click()
        wait.until(seen.presence_of_element_located((By.ID, "current-verdict")))

    try:
        sign_in("dr.hu")
        assert "FLAGGED" in browser.find_element(By.TAG_NAME, "h1").text
        assert browser.find_element(By.ID, "current-verdict").text == "none recorded"
        browser.find_element(By.ID, "verdict-pneumonia").click()
        wait.until(lambda b: b.find_element(By.ID, "current-verdict").text.startswith("Pneumonia"))
        assert "user:dr.hu" in browser.find_element(By.ID, "current-verdict").text
        browser.find_element(By.ID, "verdict-normal").click()
        wait.until(lambda b: b.find_element(By.ID, "current-verdict").text.startswith("No pneumonia"))

        sign_in("op.iv")
        assert browser.find_elements(By.ID, "verdict-pneumonia") == []
        assert "does not record verdicts" in browser.find_element(By.ID, "verdict").text
    finally:
        browser.quit()
    with sessions() as s:
        history = study_verdicts(s, study_instance_uid=FLAGGED)["verdicts"]
    assert [(v["finding"], v["actor"]) for v in history] == [("pneumonia", "user:dr.hu"), ("normal", "user:dr.hu")]
    from db.audit import recent_audit

    with sessions() as s:
        actors = {(e["actor"], e["action"]) for e in recent_audit(s, limit=500)}
    engine.dispose()
    assert ("user:dr.hu", "POST /web/studies/{study_instance_uid}/verdict") in actors
    assert ("user:op.iv", "GET /web/studies/{study_instance_uid}") in actors
