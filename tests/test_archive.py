"""The archive side, with real processes: `pneumoscreen ingest` imports a folder
through the listener's store path, `pneumoscreen rescreen` screens stored
studies again with a new model version (in process on the embedded default;
through real Celery workers over Redis and PostgreSQL in production) and
reports what changed, and the nightly beat job does the same for the
workers' configured model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from model.artifact import CARD_FILE, DEFAULT_MODEL_DIR, read_card
from tests.helpers.dicom_factory import NORMAL_JPEG, PLANTED_PATIENT_ID, PNEUMONIA_JPEG, write_chest_dicom
from tests.helpers.processes import Process, cli_env, cli_json, free_port, run_cli, start_run, storescu, wait_until

pytestmark = pytest.mark.slow

TERMINAL = {"PREDICTED", "SKIPPED", "FAILED"}


def new_model_version(tmp_path: Path, version: str, threshold: float) -> Path:
    """The shipped weights under a new version and threshold: a "retrained" model whose answers differ."""
    out = tmp_path / f"model-{version}"
    shutil.copytree(DEFAULT_MODEL_DIR, out)
    card = json.loads((out / CARD_FILE).read_text())
    card.update(version=version, threshold=threshold)
    (out / CARD_FILE).write_text(json.dumps(card))
    assert read_card(out).version == version
    return out


def _all_terminal(env, count: int):
    rows = cli_json("instances", env=env)
    return rows if len(rows) == count and all(r["state"] in TERMINAL for r in rows) else None


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ingest_then_rescreen_with_a_new_model_on_the_embedded_default(tmp_path, processes):
    folder = tmp_path / "archive"
    pneumonia = write_chest_dicom(folder / "2026" / "pneumonia.dcm", PNEUMONIA_JPEG, sop_class="CR")
    normal = write_chest_dicom(folder / "2026" / "normal.dcm", NORMAL_JPEG, sop_class="DX",
                               transfer_syntax=JPEGBaseline8Bit)
    adult = write_chest_dicom(folder / "2026" / "adult.dcm", NORMAL_JPEG, sop_class="CR", patient_age="045Y")
    shutil.copy(folder / "2026" / "pneumonia.dcm", folder / "copy-of-pneumonia.dcm")  # same SOP Instance UID
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")  # a real CT: stored, then SKIPPED
    (folder / "README.txt").write_text("not DICOM\n")
    (folder / "truncated.dcm").write_bytes((folder / "ct.dcm").read_bytes()[:300])
    before = _digest(folder)

    data_dir = tmp_path / "data"
    env = cli_env(data_dir=data_dir, study_quiet_seconds=0.5)
    run_cli("db", "upgrade", env=env)
    imported = cli_json("ingest", str(folder), env=env)
    assert (imported["files"], imported["stored"], imported["duplicates"]) == (7, 4, 1)
    # a cut-off file is refused (quarantined, FAILED with its reason), never half-recorded
    assert imported["not_dicom"] + imported["refused"] == 2
    assert _digest(folder) == before, "ingest must not change the source folder"
    rows = cli_json("instances", env=env)
    assert {r["sop_instance_uid"] for r in rows} >= {pneumonia.SOPInstanceUID, normal.SOPInstanceUID}
    assert all(r["state"] in ("RECEIVED", "FAILED") for r in rows)

    runner = start_run({**env, "PNEUMOSCREEN_PORT": str(free_port())}, processes, tmp_path / "run.log")
    rows = wait_until(lambda: _all_terminal(env, len(rows)), timeout=120, what="imported instances screened")
    states = {r["sop_instance_uid"]: r for r in rows}
    assert states[pneumonia.SOPInstanceUID]["state"] == "PREDICTED"
    assert states[normal.SOPInstanceUID]["state"] == "PREDICTED"
    skipped = [r for r in rows if r["state"] == "SKIPPED"]
    assert len(skipped) == 2 and "intended population" in states[adult.SOPInstanceUID]["reason"]
    ct = next(r for r in skipped if r["sop_instance_uid"] != adult.SOPInstanceUID)
    assert "CT" in ct["reason"]
    runner.stop()
    assert PLANTED_PATIENT_ID not in runner.log()

    before_flags = {r["study_instance_uid"]: r["flagged"] for r in cli_json("worklist", env=env)}
    assert before_flags[pneumonia.StudyInstanceUID] is True
    assert before_flags[normal.StudyInstanceUID] is False

    eager = new_model_version(tmp_path, "9.0.0-eager", threshold=0.0001)
    report = cli_json("rescreen", "--model", str(eager), env=env)
    assert report["model_version"] == "9.0.0-eager"
    assert (report["queued"], report["rescreened"], report["pending"], report["still_open"]) == (2, 2, 0, 0)
    assert (report["newly_flagged"], report["unflagged"], report["unchanged"]) == (1, 0, 1)
    assert report["changed_studies"] == [{"study_instance_uid": normal.StudyInstanceUID,
                                          "accession_number": normal.AccessionNumber,
                                          "flagged_before": False, "flagged_after": True}]
    worklist = cli_json("worklist", env=env)
    screened = [r for r in worklist if r["state"] == "SCREENED"]
    assert {r["model_version"] for r in screened} == {"9.0.0-eager"}
    assert all(r["flagged"] for r in screened)
    # the study detail keeps both models' answers
    again = cli_json("rescreen", "--model", str(eager), env=env)
    assert again["queued"] == 0, "a second rescreen has nothing left to do"
    assert cli_json("worklist", "--since", "2999-01-01", env=env) == []
    assert len(cli_json("worklist", "--state", "SCREENED", "--flagged-only", env=env)) == 2
    table = run_cli("rescreen", "--model", str(eager), env=env).stdout
    assert "queued" in table and "9.0.0-eager" in table

    # the site has validated the model on every age: the films skipped for their age are screened now,
    # the others judged again and skipped again with their reason
    screen_any = {**env, "PNEUMOSCREEN_INTENDED_POPULATION": "any"}
    report = cli_json("rescreen", "--model", str(eager), "--include-skipped", env=screen_any)
    assert (report["queued"], report["rescreened"], report["not_screened"], report["pending"]) == (2, 1, 1, 0)
    states = {r["sop_instance_uid"]: r for r in cli_json("instances", env=env)}
    assert states[adult.SOPInstanceUID]["state"] == "PREDICTED" and states[adult.SOPInstanceUID]["reason"] is None
    assert states[adult.SOPInstanceUID]["population_note"].startswith("outside the intended population")
    assert states[ct["sop_instance_uid"]]["state"] == "SKIPPED" and "CT" in states[ct["sop_instance_uid"]]["reason"]
    again = cli_json("rescreen", "--model", str(eager), "--include-skipped", env=screen_any)
    assert (again["queued"], again["rescreened"], again["not_screened"]) == (1, 0, 1)  # the CT, judged again


def test_rescreen_and_nightly_job_through_celery_workers_on_redis_and_postgresql(tmp_path, redis_url, processes,
                                                                                 production):
    env, port, _, worker = production(study_quiet_seconds=0.5)
    files = [tmp_path / "p.dcm", tmp_path / "n.dcm"]
    pneumonia = write_chest_dicom(files[0], PNEUMONIA_JPEG, transfer_syntax=ExplicitVRLittleEndian)
    normal = write_chest_dicom(files[1], NORMAL_JPEG, transfer_syntax=ExplicitVRLittleEndian)
    assert storescu(port, *files).returncode == 0
    first = wait_until(lambda: _all_terminal(env, 2), timeout=120, what="first screening")
    low, high = sorted(r["probability"] for r in first)
    assert 0.0 < low < high < 1.0

    # an operator rescreens with a stricter model the workers can read: above both images' scores
    strict = new_model_version(tmp_path, "9.1.0-strict", threshold=(high + 1.0) / 2)
    report = cli_json("rescreen", "--model", str(strict), "--timeout", "120", env=env)
    assert (report["queued"], report["rescreened"], report["still_open"]) == (2, 2, 0)
    assert report["unflagged"] == 1 and report["newly_flagged"] == 0
    assert report["changed_studies"] == [{"study_instance_uid": pneumonia.StudyInstanceUID,
                                          "accession_number": pneumonia.AccessionNumber,
                                          "flagged_before": True, "flagged_after": False}]
    assert "9.1.0-strict" in worker.log()

    # a new model is deployed to the workers; the nightly job (beat's task) rescreens the archive with it
    worker.stop()
    eager = new_model_version(tmp_path, "9.2.0-eager", threshold=low / 2)  # below both
    deployed = {**env, "PNEUMOSCREEN_MODEL_DIR": str(eager)}
    worker = Process(["worker", "--queues", "preprocess,inference,maintenance"], deployed, tmp_path / "worker2.log")
    processes.append(worker)
    from worker.celery_app import app

    app.conf.broker_url = redis_url
    app.send_task("pneumoscreen.rescreen_archive")

    def rescreened():
        rows = cli_json("worklist", env=env)
        return rows if {r["model_version"] for r in rows} == {"9.2.0-eager"} else None

    rows = wait_until(rescreened, timeout=120, what="nightly rescreen with the deployed model")
    assert {r["study_instance_uid"]: r["flagged"] for r in rows} == {pneumonia.StudyInstanceUID: True,
                                                                     normal.StudyInstanceUID: True}
    assert "queued for model 9.2.0-eager" in worker.log()
