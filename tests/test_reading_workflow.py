"""Where radiologists read, all at once: one study sent by C-STORE to the production topology reaches the
RIS as a matched ORU^R01 (after one AE), the FHIR server as one DiagnosticReport, and the PACS as an IHE
AIR SR that dciodvfy finds no error in, each a delivery row of its own kind, SENT with its receipt.

Peers, each in its own process: Orthanc (the PACS), the MLLP RIS of tests/helpers/ris.py (python-hl7's
asyncio server), and the FHIR endpoint of tests/helpers/fhir_server.py (it validates what it receives with
fhir.resources and stands in for a FHIR server, since none runs here).
"""

from __future__ import annotations

import io
import shutil
import subprocess

import hl7
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.models import DeliveryState
from dicom_io.sr import PROCESSING_ALGORITHM
from model.artifact import read_card
from tests.helpers.dicom_factory import NORMAL_JPEG, PLANTED_PATIENT_ID, PNEUMONIA_JPEG, chest_dataset
from tests.helpers.fhir_server import FhirServer
from tests.helpers.orthanc import Orthanc
from tests.helpers.processes import free_port, storescu, wait_until
from tests.helpers.records import delivery_rows
from tests.helpers.ris import RisPeer
from worker.hl7.oru import validate_oru

pytestmark = pytest.mark.slow

TOKEN = "fhir-token-0123456789abcdef"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _films(folder, study: str) -> list:
    paths = []
    for jpeg, kind in ((PNEUMONIA_JPEG, "CR"), (NORMAL_JPEG, "DX")):
        ds = chest_dataset(jpeg, study_uid=study, transfer_syntax=ExplicitVRLittleEndian, sop_class=kind)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _dciodvfy_errors(data: bytes, path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is not installed: apt-get install dicom3tools (.ci/run does)")
    path.write_bytes(data)
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_one_study_reaches_the_ris_the_fhir_server_and_the_pacs(tmp_path, pg_url, processes, production):
    orthanc = Orthanc(tmp_path / "orthanc", modalities={})
    ris = RisPeer(tmp_path / "ris", answers="AE,AA")
    fhir = FhirServer(tmp_path / "fhir", free_port(), token=TOKEN)
    try:
        _, port, _, _ = production(
            study_quiet_seconds=0.5, results_destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            hl7_destination=ris.address, fhir_base_url=fhir.url, fhir_token=TOKEN)
        study = generate_uid()
        assert storescu(port, *_films(tmp_path / "send", study)).returncode == 0
        rows = wait_until(lambda: (r := delivery_rows(pg_url)) and len(r) == 3
                          and all(d.state == DeliveryState.SENT for d in r) and r or None,
                          timeout=180, what="the study SENT to the PACS, the RIS and the FHIR server")
        oru = ris.messages()
        reports = fhir.current("DiagnosticReport")
        [sr_id] = [i for i in orthanc.get("/instances")
                   if orthanc.get(f"/instances/{i}/simplified-tags").get("SOPClassUID") == SR_CLASS]
        sr_bytes = orthanc.download(sr_id)
    finally:
        fhir.stop()
        ris.stop()
        orthanc.stop()
    by_kind = {row.kind: row for row in rows}
    assert set(by_kind) == {"dicom", "hl7", "fhir"}

    # the RIS: refused once, then taken under the same control ID, matched by accession and study
    assert [m["answered"] for m in oru] == ["AE", "AA"]
    refused, accepted = (hl7.parse(m["message"]) for m in oru)
    control_id = str(accepted.segment("MSH")(10))
    assert str(refused.segment("MSH")(10)) == control_id and by_kind["hl7"].receipt.startswith(control_id)
    validate_oru(str(accepted))
    assert str(accepted.segment("OBR")(18)) and study in str(accepted)
    assert accepted.unescape(str(accepted.segment("PID")(3)(1)(1))) == PLANTED_PATIENT_ID

    # the FHIR server: one DiagnosticReport for the study, its location the receipt
    [(key, report)] = reports.items()
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
    assert by_kind["fhir"].receipt.startswith(key)

    # the PACS: the SR the receipt names, AIR's algorithm item on it, and no error by the reference validator
    sr = dcmread(io.BytesIO(sr_bytes))
    assert sr.SOPInstanceUID == by_kind["dicom"].receipt and sr.StudyInstanceUID == study
    card = read_card()
    [equipment] = [item for item in sr.ContributingEquipmentSequence
                   if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value]
    assert equipment.SoftwareVersions == card.version
    assert _dciodvfy_errors(sr_bytes, tmp_path / "sr.dcm") == []
