"""Results back to a real PACS (Orthanc) and studies pulled from it, end to end:

- screened studies come back to Orthanc as DICOM SR (and Grad-CAM Secondary
  Captures for flagged images), read back with highdicom and compared with
  the database; a PACS that is down at first gets the report on a retry;
- `pneumoscreen rescreen --from-pacs` finds CR/DX studies of a date range with
  C-FIND, pulls them with C-MOVE to our listener, and they are screened.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.models import DeliveryState
from dicom_io.sr import read_screening_report
from model.artifact import read_card
from tests.helpers.dicom_factory import (
    NORMAL_JPEG,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    PNEUMONIA_JPEG,
    chest_dataset,
)
from tests.helpers.orthanc import Orthanc
from tests.helpers.processes import cli_env, cli_json, free_port, run_cli, start_run, storescu, wait_until
from tests.helpers.records import delivery_rows

pytestmark = pytest.mark.slow

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _write(folder: Path, jpeg: Path, *, study_uid: str, study_date: str = "20261115", **kwargs) -> Path:
    ds = chest_dataset(jpeg, study_uid=study_uid, transfer_syntax=ExplicitVRLittleEndian, **kwargs)
    ds.StudyDate = study_date
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _objects_in(orthanc: Orthanc, study_uid: str) -> dict[str, list]:
    """Orthanc's instances of ``study_uid`` by SOP class, read back with pydicom."""
    found: dict[str, list] = {}
    for orthanc_id in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        if tags.get("StudyInstanceUID") == study_uid:
            ds = dcmread(__import__("io").BytesIO(orthanc.download(orthanc_id)))
            found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def test_screened_studies_go_back_to_the_pacs_as_sr_and_heatmaps_even_when_it_is_down_at_first(
    tmp_path, pg_url, processes, production
):
    pacs_port = free_port()
    env, port, _, _ = production(study_quiet_seconds=0.5, results_destination=f"ORTHANC@127.0.0.1:{pacs_port}",
                                 results_heatmaps="flagged")

    study = generate_uid()
    files = [_write(tmp_path / "send", PNEUMONIA_JPEG, study_uid=study, sop_class="CR"),
             _write(tmp_path / "send", NORMAL_JPEG, study_uid=study, sop_class="DX")]
    assert storescu(port, *files).returncode == 0

    # the PACS is down: the report waits (PENDING with the reason) instead of being lost
    def refused_once():
        rows = delivery_rows(pg_url)
        return rows if rows and rows[0].reason and rows[0].state == DeliveryState.PENDING else None

    [pending] = wait_until(refused_once, timeout=120, what="a refused delivery waiting for its retry")
    assert "no association" in pending.reason and pending.attempts >= 1

    orthanc = Orthanc(tmp_path / "orthanc", modalities={}, extra_config={"DicomPort": pacs_port})
    try:
        [delivered] = wait_until(
            lambda: [r for r in delivery_rows(pg_url) if r.state == DeliveryState.SENT] or None,
            timeout=120, what="the report delivered on a retry")
        objects = wait_until(lambda: (o := _objects_in(orthanc, study)) and len(o) == 2 and o or None,
                             timeout=30, what="SR and heatmap in Orthanc")
    finally:
        orthanc.stop()

    [sr] = [ds for uid, items in objects.items() if uid in SR_CLASSES for ds in items]
    report = read_screening_report(sr)
    card = read_card()
    instances = {r["sop_instance_uid"]: r for r in cli_json("instances", env=env)}
    assert report.study_instance_uid == study and sr.SOPInstanceUID == delivered.receipt
    assert (report.model_name, report.model_version, report.weights_sha256) == (card.name, card.version, card.sha256)
    assert report.threshold == pytest.approx(card.threshold)
    assert {uid for uid, _, _ in report.images} == set(instances)
    for uid, probability, flagged in report.images:
        assert probability == pytest.approx(instances[uid]["probability"], abs=1e-5)
        assert flagged == (probability >= card.threshold)
    assert report.flagged == any(flagged for _, _, flagged in report.images)
    assert report.max_probability == pytest.approx(max(p for _, p, _ in report.images), abs=1e-5)
    assert report.notes == {}  # children within the model's intended population
    # patient and study modules come from the source images
    assert str(sr.PatientID) == PLANTED_PATIENT_ID and sr.StudyInstanceUID == study

    heatmaps = objects.get(SECONDARY_CAPTURE, [])
    flagged_uids = {uid for uid, _, flagged in report.images if flagged}
    assert len(heatmaps) == len(flagged_uids) >= 1
    for sc in heatmaps:
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in flagged_uids
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.ndim == 3
        assert card.version in sc.DerivationDescription
    for p in processes:
        assert PLANTED_PATIENT_NAME.split("^")[0] not in p.log() and PLANTED_PATIENT_ID not in p.log()


def test_rescreen_from_pacs_pulls_the_cr_dx_studies_of_a_date_range_and_screens_them(tmp_path, processes):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"pneumoscreen": ("PNEUMOSCREEN", "127.0.0.1", port)})
    try:
        upload = tmp_path / "upload"
        wanted = {
            generate_uid(): ("20261103", PNEUMONIA_JPEG, "CR"),
            generate_uid(): ("20261120", NORMAL_JPEG, "DX"),
        }
        for study, (date, jpeg, kind) in wanted.items():
            orthanc.upload(_write(upload, jpeg, study_uid=study, study_date=date, sop_class=kind, modality=kind))
        too_old = generate_uid()
        orthanc.upload(_write(upload, NORMAL_JPEG, study_uid=too_old, study_date="20250101", sop_class="CR"))
        ct = dcmread(get_testdata_file("CT_small.dcm"))
        ct.StudyDate = "20261110"
        ct.save_as(upload / "ct.dcm")
        orthanc.upload(upload / "ct.dcm")

        env = cli_env(data_dir=tmp_path / "data", port=port, study_quiet_seconds=0.5)
        runner = start_run(env, processes, tmp_path / "run.log")
        pacs = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"

        pulled = cli_json("rescreen", "--from-pacs", pacs, "--since", "2026-11-01", "--until", "2026-11-30",
                          "--timeout", "120", env=env)
        assert (pulled["found"], pulled["already_received"], pulled["moved_studies"]) == (2, 0, 2)
        assert (pulled["moved_instances"], pulled["failed_instances"], pulled["still_open"]) == (2, 0, 0)
        assert pulled["failed_studies"] == []
        rows = {r["study_instance_uid"]: r for r in pulled["studies"]}
        assert set(rows) == set(wanted)
        assert all(r["state"] == "SCREENED" for r in rows.values())
        assert pulled["flagged_studies"] == sum(r["flagged"] for r in rows.values())
        stored = {r["study_instance_uid"] for r in cli_json("instances", env=env)}
        assert stored == set(wanted), "the CT and the study outside the date range stay on the PACS"

        again = cli_json("rescreen", "--from-pacs", pacs, "--since", "2026-11-01", "--no-wait", env=env)
        assert (again["found"], again["already_received"], again["moved_studies"]) == (2, 2, 0)

        closed = run_cli("rescreen", "--from-pacs", f"NOBODY@127.0.0.1:{free_port()}", env=env, check=False)
        assert closed.returncode != 0 and "C-FIND" in closed.stderr
    finally:
        orthanc.stop()
    assert PLANTED_PATIENT_NAME.split("^")[0] not in runner.log()
