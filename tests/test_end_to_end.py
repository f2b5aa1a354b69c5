"""A chest X-ray sent by a PACS becomes a prioritized result, end to end, with
real peers: dcmtk's storescu and pynetdicom as senders, the listener and a
Celery worker as separate processes over Redis and PostgreSQL, and the
embedded default (`pneumoscreen run`, SQLite, in-process broker). Films of
patients outside the model card's intended population (ages 1-5) are skipped,
or screened and marked when the site screens every age."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from model.artifact import read_card
from tests.helpers.dicom_factory import (
    NORMAL_JPEG,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    PNEUMONIA_JPEG,
    write_chest_dicom,
)
from tests.helpers.processes import (
    Process,
    cli_env,
    cli_json,
    free_port,
    run_cli,
    start_run,
    storescu,
    wait_for_port,
    wait_until,
)

AGE_UNKNOWN = "age unknown: not confirmed within the intended population (ages 1-5)"
ADULT_BIRTH_DATE = "19800101"
"""46 years old at the generated films' study date (2026-11-26)."""

pytestmark = pytest.mark.slow


def _all_terminal(env):
    rows = cli_json("instances", env=env)
    return rows if rows and all(r["state"] in ("PREDICTED", "SKIPPED", "FAILED") for r in rows) else None


def _assert_screened(env, *, pneumonia_study: str, normal_study: str, expected_instances: int) -> None:
    """Every instance ended; the pneumonia and the normal study's films were screened, within the
    intended population, and the pneumonia study is read first."""
    card = read_card()
    instances = wait_until(lambda: _all_terminal(env), timeout=90, what="every instance terminal")
    assert len(instances) == expected_instances
    studies = (pneumonia_study, normal_study)
    for row in instances:
        if row["study_instance_uid"] in studies:
            assert row["state"] == "PREDICTED" and row["population_note"] is None, row
            assert 0.0 <= row["probability"] <= 1.0
            assert row["model_version"] == card.version

    worklist = [row for row in cli_json("worklist", env=env) if row["study_instance_uid"] in studies]
    by_study = {row["study_instance_uid"]: row for row in worklist}
    assert set(by_study) == set(studies)
    for row in worklist:
        assert row["state"] == "SCREENED"
        assert row["model_version"] == card.version
        assert row["max_probability"] is not None
        assert row["flagged"] == (row["max_probability"] >= card.threshold)
    # the pneumonia film is read before the normal one
    assert [r["study_instance_uid"] for r in worklist] == [pneumonia_study, normal_study]
    assert by_study[pneumonia_study]["flagged"] is True
    assert by_study[pneumonia_study]["priority"] < by_study[normal_study]["priority"]
    flagged = cli_json("worklist", "--flagged-only", env=env)
    assert pneumonia_study in {r["study_instance_uid"] for r in flagged}
    assert normal_study not in {r["study_instance_uid"] for r in flagged}


def _send_with_pynetdicom(port: int, path: Path) -> int:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(SecondaryCaptureImageStorage, JPEGBaseline8Bit)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN")
    assert assoc.is_established
    try:
        from pydicom import dcmread

        status = assoc.send_c_store(dcmread(path))
    finally:
        assoc.release()
    return int(status.Status)


def test_study_from_storescu_and_pynetdicom_is_predicted_with_redis_postgres_and_worker_process(
    tmp_path, processes, production
):
    """With them, three films outside the intended population or of unknown age: the worker skips
    the adults' (aged by PatientAge, and by birth date and study date) and screens the third, noted."""
    env, port, _, _ = production(study_quiet_seconds=1)

    pneumonia = write_chest_dicom(tmp_path / "pneumonia.dcm", PNEUMONIA_JPEG, transfer_syntax=ExplicitVRLittleEndian)
    normal = write_chest_dicom(tmp_path / "normal_jpeg.dcm", NORMAL_JPEG, transfer_syntax=JPEGBaseline8Bit)
    aged_45 = write_chest_dicom(tmp_path / "aged_45.dcm", NORMAL_JPEG, sop_class="CR", birth_date=None,
                                patient_age="045Y", accession="AGED45")
    born_1980 = write_chest_dicom(tmp_path / "born_1980.dcm", NORMAL_JPEG, sop_class="CR",
                                  birth_date=ADULT_BIRTH_DATE, accession="BORN1980")
    no_age = write_chest_dicom(tmp_path / "no_age.dcm", NORMAL_JPEG, sop_class="CR", birth_date=None, accession="NOAGE")
    sent = storescu(port, *(tmp_path / f"{name}.dcm" for name in ("pneumonia", "aged_45", "born_1980", "no_age")))
    assert sent.returncode == 0, sent.stderr
    assert _send_with_pynetdicom(port, tmp_path / "normal_jpeg.dcm") == 0x0000

    _assert_screened(env, pneumonia_study=pneumonia.StudyInstanceUID, normal_study=normal.StudyInstanceUID,
                     expected_instances=5)
    rows = {row["sop_instance_uid"]: row for row in cli_json("instances", env=env)}
    for ds, aged in ((aged_45, "45 years"), (born_1980, "46 years")):
        row = rows[ds.SOPInstanceUID]
        assert row["state"] == "SKIPPED" and row["probability"] is None and row["population_note"] is None
        assert row["reason"].startswith(f"outside the model's intended population: patient aged {aged} (the model "
                                        "was trained on ages 1-5: paediatric chest radiographs")
        assert "PNEUMOSCREEN_INTENDED_POPULATION=any" in row["reason"]
    unknown = rows[no_age.SOPInstanceUID]
    assert unknown["state"] == "PREDICTED" and unknown["population_note"] == AGE_UNKNOWN
    worklist = {row["accession_number"]: row for row in cli_json("worklist", env=env)}
    assert worklist["NOAGE"]["state"] == "SCREENED" and worklist["NOAGE"]["population_note"] == AGE_UNKNOWN
    assert worklist["AGED45"]["state"] == worklist["BORN1980"]["state"] == "NOT_SCREENED"
    for p in processes:
        assert PLANTED_PATIENT_NAME.split("^")[0] not in p.log()
        assert PLANTED_PATIENT_ID not in p.log()
        assert ADULT_BIRTH_DATE not in p.log()


def test_embedded_default_screens_uncompressed_and_jpeg_baseline_from_storescu(tmp_path, processes):
    """At a site that screens every age (``PNEUMOSCREEN_INTENDED_POPULATION=any``), an adult's film is
    screened too, and its result marked."""
    port = free_port()
    data_dir = tmp_path / "data"
    env = cli_env(study_quiet_seconds=1, intended_population="any")
    runner = Process(["run", "--data-dir", str(data_dir), "--port", str(port)], env, tmp_path / "run.log")
    processes.append(runner)
    wait_for_port(port, runner.proc)

    pneumonia = write_chest_dicom(tmp_path / "pneumonia_jpeg.dcm", PNEUMONIA_JPEG, transfer_syntax=JPEGBaseline8Bit)
    normal = write_chest_dicom(tmp_path / "normal.dcm", NORMAL_JPEG, transfer_syntax=ExplicitVRLittleEndian,
                               sop_class="CR", modality="CR")
    adult = write_chest_dicom(tmp_path / "adult.dcm", NORMAL_JPEG, sop_class="CR", birth_date=None,
                              patient_age="045Y", accession="ADULT")
    sent = storescu(port, tmp_path / "pneumonia_jpeg.dcm", jpeg_as_is=True)
    assert sent.returncode == 0, sent.stderr
    sent = storescu(port, tmp_path / "normal.dcm", tmp_path / "adult.dcm")
    assert sent.returncode == 0, sent.stderr

    query_env = cli_env(data_dir=data_dir)
    _assert_screened(query_env, pneumonia_study=pneumonia.StudyInstanceUID, normal_study=normal.StudyInstanceUID,
                     expected_instances=3)
    outside = "outside the intended population: patient aged 45 years (trained on ages 1-5)"
    [row] = cli_json("instances", "--study", adult.StudyInstanceUID, env=query_env)
    assert row["state"] == "PREDICTED" and row["population_note"] == outside
    [study] = [r for r in cli_json("worklist", env=query_env) if r["accession_number"] == "ADULT"]
    assert study["state"] == "SCREENED" and study["population_note"] == outside
    assert "outside the intended population" in run_cli("worklist", env=query_env).stdout
    assert (data_dir / "pneumoscreen.db").is_file()
    spooled = sorted(p.name for p in (data_dir / "spool").rglob("*.dcm"))
    assert spooled == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in (pneumonia, normal, adult))
    assert PLANTED_PATIENT_NAME.split("^")[0] not in runner.log()
    assert "every age is screened (PNEUMOSCREEN_INTENDED_POPULATION=any)" in runner.log()


def test_embedded_default_resumes_work_left_in_flight_by_a_previous_run(tmp_path, processes):
    """A crash left an instance QUEUED (its message died with the in-process broker):
    the next `run` sends it again at start-up instead of after the reconcile timeout."""
    from db.migrate import upgrade
    from db.models import InstanceState
    from db.queries import record_received, set_state
    from db.session import make_engine, make_sessionmaker
    from dicom_io.spool import Spool

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'pneumoscreen.db'}"
    upgrade(url)
    ds = write_chest_dicom(tmp_path / "x.dcm", PNEUMONIA_JPEG)
    final = Spool(data_dir / "spool").path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    final.parent.mkdir(parents=True)
    (tmp_path / "x.dcm").rename(final)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:
        instance_id, _ = record_received(
            s, StudyInstanceUID=ds.StudyInstanceUID, SeriesInstanceUID=ds.SeriesInstanceUID,
            SOPInstanceUID=ds.SOPInstanceUID, SOPClassUID=ds.SOPClassUID, TransferSyntaxUID=ExplicitVRLittleEndian,
            AccessionNumber="A", Modality="CR", path=str(final), size_bytes=final.stat().st_size, calling_ae="X")
        set_state(s, instance_id=instance_id, state=InstanceState.QUEUED)
    engine.dispose()

    port = free_port()
    runner = Process(["run", "--data-dir", str(data_dir), "--port", str(port)], cli_env(), tmp_path / "run.log")
    processes.append(runner)
    env = cli_env(data_dir=data_dir)
    wait_until(lambda: [r["state"] for r in cli_json("instances", env=env)] == ["PREDICTED"], timeout=60,
               what="the left-over instance PREDICTED")


def test_embedded_default_stops_on_sigterm_even_when_beat_cannot_save_its_schedule(tmp_path, processes):
    """A full or vanished data disk makes beat's last schedule save fail; the stop still ends."""
    port = free_port()
    data_dir = tmp_path / "data"
    runner = Process(["run", "--data-dir", str(data_dir), "--port", str(port)], cli_env(), tmp_path / "run.log")
    processes.append(runner)
    wait_for_port(port, runner.proc)
    wait_until(lambda: " ready." in runner.log(), timeout=60, what="the Celery worker ready")
    schedule = wait_until(lambda: list(data_dir.glob("celerybeat-schedule*.dat")), timeout=30,
                          what="beat's schedule file")
    for path in schedule:
        path.unlink()  # the next save cannot open it
    runner.proc.terminate()
    try:
        code = runner.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`pneumoscreen run` still running 30 s after SIGTERM; log:\n{runner.log()[-3000:]}")
    assert code == 0
    assert "FileNotFoundError" in runner.log()  # the failed save happened, and did not hold the stop



def test_embedded_default_receives_in_a_process_of_its_own_started_again_when_killed(tmp_path, processes):
    """`run` keeps the interpreter lock for the workers: a receiver process takes the associations;
    killed, it is started again, and what it stored before and after is screened."""
    import contextlib
    import os
    import signal
    from pathlib import Path

    port, data_dir = free_port(), tmp_path / "data"
    runner = start_run(cli_env(data_dir=data_dir, port=port, study_quiet_seconds=1), processes, tmp_path / "run.log")

    def receivers() -> list[int]:
        """Children of any of the runner's threads (the receivers are started from one of them)."""
        found = []
        for task in Path(f"/proc/{runner.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(pid) for pid in (task / "children").read_text().split()
                          if b"--receiver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        return found

    [first] = wait_until(receivers, timeout=30, what="the receiver process")
    write_chest_dicom(tmp_path / "before.dcm", PNEUMONIA_JPEG, sop_class="CR")
    assert storescu(port, tmp_path / "before.dcm").returncode == 0
    os.kill(first, signal.SIGKILL)
    [again] = wait_until(lambda: [pid for pid in receivers() if pid != first], timeout=30, what="a new receiver")
    wait_for_port(port)
    write_chest_dicom(tmp_path / "after.dcm", NORMAL_JPEG, sop_class="CR")
    sent = wait_until(lambda: storescu(port, tmp_path / "after.dcm").returncode == 0, timeout=30,
                      what="the new receiver answering")
    assert sent and again != first
    query_env = cli_env(data_dir=data_dir)
    wait_until(lambda: [row["state"] for row in cli_json("instances", env=query_env)] == ["PREDICTED"] * 2,
               timeout=120, what="both films PREDICTED")
    assert "exited with status -9; starting it again" in runner.log()


def test_a_model_of_another_input_size_is_fed_at_its_card_s_size_through_the_listener_and_the_cli(
        tmp_path, processes):
    """The pipeline prepares each film at the size the configured model's card names (here an
    untrained 96-pixel network): its probability is the network's own on the film prepared at 96."""
    import numpy as np
    from pydicom import dcmread

    from dicom_io.pixels import display_image
    from model.artifact import get_model, save_artifact
    from model.network import build_network
    from model.preprocessing import prepare

    model_dir = tmp_path / "model96"
    save_artifact(build_network(96, augment=False), model_dir, name="cnn96", version="0.0.96", threshold=0.5,
                  input_size=96)
    film = tmp_path / "pneumonia.dcm"
    ds = write_chest_dicom(film, PNEUMONIA_JPEG, sop_class="CR", accession="SIZE96")
    expected = get_model(model_dir).predict(prepare(display_image(dcmread(film)), 96)[None])[0]

    port = free_port()
    env = cli_env(data_dir=tmp_path / "data", port=port, study_quiet_seconds=1, model_dir=model_dir)
    start_run(env, processes, tmp_path / "run.log")
    sent = storescu(port, film)
    assert sent.returncode == 0, sent.stderr
    [row] = wait_until(lambda: _all_terminal(env), timeout=90, what="the instance ended")
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert row["state"] == "PREDICTED", row["reason"]
    assert row["model_version"] == "0.0.96" and row["probability"] == pytest.approx(expected, abs=1e-5)

    [predicted] = cli_json("predict", str(film), "--model", str(model_dir), "--heatmap", str(tmp_path / "maps"),
                           env=env)
    assert predicted["probability"] == pytest.approx(expected, abs=1e-5) and predicted["error"] is None
    assert Path(predicted["heatmap"]).is_file() and np.isfinite(predicted["probability"])
