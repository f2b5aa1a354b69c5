"""Results to a FHIR server as a DiagnosticReport with its Observations and Device (worker.fhir.report,
worker.delivery.fhir):

- the transaction Bundle: validated R4 resources (fhir.resources), deterministic, the study, patient, order
  and model named, applied by the receiving endpoint's own transaction logic (references resolve);
- a new model version's report replaces the earlier one in place, ``corrected`` when the answer changed;
- against the receiving endpoint in its own process (tests/helpers/fhir_server.py, standing in for a FHIR
  server because none runs here): the bearer token, the server's OperationOutcome as the reason, no answer;
- end to end through the production topology: a film sent by C-STORE ends as one DiagnosticReport, though
  the server stored the first transaction and lost its answer (a retried POST makes no second report).
"""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import SecretStr
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.deliveries import DeliveryJob, EarlierDelivery, ScreenedImage
from db.models import DeliveryState
from fhir.resources.R4B.bundle import Bundle
from tests.helpers.dicom_factory import NORMAL_JPEG, PLANTED_PATIENT_ID, PNEUMONIA_JPEG, chest_dataset
from tests.helpers.fhir_server import FhirServer, Refused, Store, matches, transaction
from tests.helpers.processes import cli_json, free_port, storescu, wait_until
from tests.helpers.records import delivery_rows
from worker.delivery import SendError, configured_destinations
from worker.delivery.fhir import FhirDestination
from worker.fhir.report import DICOM_UID, Identifiers, report_bundle
from worker.settings import Settings

MRN = "urn:oid:2.16.840.1.113883.19.5"
TOKEN = "fhir-token-" + "x" * 20


def _film(folder, jpeg, study: str, **kwargs):
    ds = chest_dataset(jpeg, study_uid=study, transfer_syntax=ExplicitVRLittleEndian, **kwargs)
    ds.StudyDate = "20261102"
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _job(tmp_path, probabilities=(0.91, 0.12), *, version="0.6.0", earlier=(), accession="ACC0001") -> DeliveryJob:
    study = generate_uid()
    images = []
    for probability in probabilities:
        path, ds = _film(tmp_path / "films", PNEUMONIA_JPEG, study)
        images.append(ScreenedImage(ds.SOPInstanceUID, str(path), probability, probability >= 0.5, 0.5, "cnn",
                                    "ab" * 32, None))
    return DeliveryJob(1, study, version, "fhir", "http://fhir", 1, tuple(images), accession, tuple(earlier))


def _resources(bundle: Bundle, kind: str) -> list:
    return [entry.resource for entry in bundle.entry if entry.resource.get_resource_type() == kind]


def test_the_report_bundle_is_valid_r4_naming_the_study_patient_order_and_model(tmp_path):
    job = _job(tmp_path)
    bundle = report_bundle(job, Identifiers(patient_system=MRN))
    text = bundle.model_dump_json(exclude_none=True)
    assert report_bundle(job, Identifiers(patient_system=MRN)).model_dump_json(exclude_none=True) == text
    again = Bundle.model_validate_json(text)  # the JSON read back validates as the models
    assert again.type == "transaction"

    [report] = _resources(again, "DiagnosticReport")
    assert report.status == "preliminary"
    assert {(c.system, c.code) for c in report.category[0].coding} == {
        ("http://loinc.org", "LP29684-5"), ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")}
    assert (report.code.coding[0].system, report.code.coding[0].code) == ("http://loinc.org", "18748-4")
    assert (report.subject.identifier.system, report.subject.identifier.value) == (MRN, PLANTED_PATIENT_ID)
    study = report.imagingStudy[0].identifier
    assert (study.system, study.value) == (DICOM_UID, f"urn:oid:{job.StudyInstanceUID}")
    assert report.basedOn[0].identifier.value == "ACC0001" and report.basedOn[0].type == "ServiceRequest"
    assert report.effectiveDateTime.isoformat() == "2026-11-02"
    assert "FLAGGED" in report.conclusion and report.conclusionCode[0].coding[0].code == "233604007"

    [device] = _resources(again, "Device")
    assert device.deviceName[0].name == "cnn"
    assert [v.value for v in device.version] == ["0.6.0", "ab" * 32]
    observations = _resources(again, "Observation")
    assert [float(o.valueQuantity.value) for o in observations[:2]] == [0.91, 0.12]
    assert [o.interpretation[0].coding[0].code for o in observations[:2]] == ["H", "N"]
    assert float(observations[0].component[0].valueQuantity.value) == 0.5
    assert observations[2].valueCodeableConcept.coding[0].code == "52101004"  # SNOMED CT Present
    urls = {entry.resource.get_resource_type(): entry.fullUrl for entry in again.entry}
    assert [r.reference for r in report.result] == [e.fullUrl for e in again.entry[1:-1]]
    assert all(o.device.reference == urls["Device"] for o in observations)

    requests = [(e.request.method, e.request.url.split("?")[0], bool(e.request.ifNoneExist)) for e in again.entry]
    assert requests == [("POST", "Device", True)] + [("PUT", "Observation", False)] * 3 + [
        ("PUT", "DiagnosticReport", False)]
    store = Store(tmp_path / "store.json")
    answer_bundle = transaction(store, json.loads(text))
    assert [e["response"]["status"] for e in answer_bundle["entry"]] == ["201 Created"] * 5
    [stored] = store.current("DiagnosticReport").values()
    assert all(r["reference"].startswith("Observation/") for r in stored["result"])


def test_a_film_without_patient_id_or_accession_is_reported_without_subject_or_order(tmp_path):
    study = generate_uid()
    path, ds = _film(tmp_path, NORMAL_JPEG, study)
    ds.PatientID = ""
    ds.save_as(path, enforce_file_format=True)
    job = DeliveryJob(1, study, "1", "fhir", "x", 1,
                      (ScreenedImage(ds.SOPInstanceUID, str(path), 0.2, False, 0.5, "cnn", "0" * 64),), None)
    [report] = _resources(report_bundle(job), "DiagnosticReport")
    assert report.subject is None and report.basedOn is None and report.conclusionCode is None
    with pytest.raises(OSError):
        report_bundle(DeliveryJob(1, study, "1", "fhir", "x", 1, (
            ScreenedImage("1.2.3", str(tmp_path / "gone.dcm"), 0.2, False, 0.5, "cnn", "0" * 64),)))


def test_a_new_model_versions_report_replaces_the_earlier_one_and_is_corrected_when_the_answer_changed(tmp_path):
    first = _job(tmp_path, (0.2, 0.1), version="0.5.0")
    store = Store(tmp_path / "store.json")
    transaction(store, json.loads(report_bundle(first).model_dump_json(exclude_none=True)))
    same_films = DeliveryJob(**{**first.__dict__, "model_version": "0.6.0",
                                "images": tuple(ScreenedImage(**{**i.__dict__, "probability": 0.8, "flagged": True})
                                                for i in first.images[:1]) + first.images[1:],
                                "earlier": (EarlierDelivery("0.5.0", "DiagnosticReport/5/_history/1", False),)})
    transaction(store, json.loads(report_bundle(same_films).model_dump_json(exclude_none=True)))
    [(key, versions)] = [(k, v) for k, v in store.data["resources"].items() if k.startswith("DiagnosticReport/")]
    assert [v["status"] for v in versions] == ["preliminary", "corrected"]
    assert "Replaces the result of model version 0.5.0 (not flagged)" in versions[-1]["conclusion"]
    assert len(store.current("Device")) == 2, "one Device per model version"
    assert len(store.current("Observation")) == 3, "the Observations are updated in place too"
    version_id = next(i for i in versions[-1]["identifier"] if i["use"] == "secondary")
    assert matches(versions[-1], f"{version_id['system']}|{version_id['value']}")

    unchanged = DeliveryJob(**{**same_films.__dict__, "model_version": "0.7.0",
                               "earlier": same_films.earlier + (EarlierDelivery("0.6.0", key, True),)})
    [report] = _resources(report_bundle(unchanged), "DiagnosticReport")
    assert report.status == "amended"


def test_the_server_refuses_what_does_not_validate(tmp_path):
    bundle = json.loads(report_bundle(_job(tmp_path)).model_dump_json(exclude_none=True))
    bundle["entry"][-1]["resource"]["status"] = "draft"
    store = Store(tmp_path / "store.json")
    with pytest.raises(Refused, match="status 'draft'"):
        transaction(store, bundle)


@pytest.mark.slow
def test_the_token_is_sent_and_the_servers_own_words_are_the_reason(tmp_path):
    server = FhirServer(tmp_path / "fhir", free_port(), token=TOKEN)
    try:
        job = _job(tmp_path)
        with pytest.raises(SendError, match="HTTP 401.*bearer token is required") as refused:
            FhirDestination(server.url).send(report_bundle(job))
        assert not refused.value.transient
        destination = FhirDestination(server.url, token=SecretStr(TOKEN), timeout=10)
        bundle = destination.build(job)
        receipt = destination.send(bundle)
        assert receipt.value.startswith("DiagnosticReport/") and receipt.value.endswith("/_history/1")
        again = destination.send(destination.build(job)).value
        assert again == receipt.value.removesuffix("/_history/1") + "/_history/2"
        assert len(server.current("DiagnosticReport")) == 1
    finally:
        server.stop()
    with pytest.raises(SendError, match="no answer from the FHIR server") as unreachable:
        destination.send(bundle)
    assert unreachable.value.transient


@pytest.mark.slow
def test_a_film_sent_by_c_store_ends_as_one_diagnostic_report_though_the_first_answer_was_lost(
    tmp_path, pg_url, processes, production
):
    server = FhirServer(tmp_path / "fhir", free_port(), token=TOKEN, fail_first="after")
    try:
        env, port, _, _ = production(study_quiet_seconds=0.5, fhir_base_url=server.url, fhir_token=TOKEN,
                                     fhir_patient_identifier_system=MRN)
        study = generate_uid()
        films = [_film(tmp_path / "send", jpeg, study, sop_class="CR")[0] for jpeg in (PNEUMONIA_JPEG, NORMAL_JPEG)]
        assert storescu(port, *films).returncode == 0
        [row] = wait_until(lambda: [r for r in delivery_rows(pg_url) if r.state == DeliveryState.SENT] or None,
                           timeout=120, what="the report delivered after the lost answer")
        reports = server.current("DiagnosticReport")
        key_identifier = next(iter(reports.values()))["identifier"][0]["value"]
        searched = httpx.get(f"{server.url}/DiagnosticReport", params={"identifier": f"{DICOM_UID}|{key_identifier}"})
    finally:
        server.stop()
    assert [r["status"] for r in server.stored()["requests"]] == [500, 200]
    assert (row.kind, row.destination, row.attempts) == ("fhir", server.url, 2)
    [(key, report)] = reports.items()
    assert row.receipt == f"{key}/_history/2" and searched.json()["total"] == 1
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
    assert report["subject"]["identifier"] == {"system": MRN, "value": PLANTED_PATIENT_ID}
    instances = {r["sop_instance_uid"]: r for r in cli_json("instances", env=env)}
    observations = server.current("Observation")
    probabilities = sorted(o["valueQuantity"]["value"] for o in observations.values() if "valueQuantity" in o)
    assert probabilities == pytest.approx(sorted(i["probability"] for i in instances.values()), abs=1e-5)
    assert len(observations) == 3 and len(server.current("Device")) == 1
    assert TOKEN not in json.dumps([row.receipt, row.reason, row.destination])
    for p in processes:
        assert PLANTED_PATIENT_ID not in p.log() and TOKEN not in p.log()


@pytest.mark.parametrize("url", ["ftp://ehr.example.org/fhir", "https://user:secret@ehr.example.org/fhir"])
def test_a_base_url_that_is_not_http_or_carries_credentials_is_refused_at_start_up(url):
    with pytest.raises(ValueError, match="without credentials"):
        Settings(fhir_base_url=url)
    assert configured_destinations(Settings(fhir_base_url="https://ehr.example.org/fhir/"))[0].address == \
        "https://ehr.example.org/fhir"
