"""DICOMweb: STOW-RS intake on `pneumoscreen api` and the SR out by STOW-RS.

- ``dicomweb-client`` (an independent STOW-RS client) stores into the API served by uvicorn in this
  process on a free port, over SQLite: the instances land in the spool and the database as a C-STORE's
  do, the answer is the PS3.18 Store Instances Response; each failure mode (not DICOM, another study,
  too large, the spool full) has its Failure Reason and HTTP status, and the caller is audited.
- A body streamed with chunked transfer encoding past the bound is cut off with 413 and leaves nothing.
- The DICOMweb destination sends the SR to that same intake (a real STOW-RS server): the receipt is the SR's
  UID, a retry stores it once, a refusal is a SendError with the archive's Failure Reason.
- Against a real Orthanc with its DicomWeb plugin: Orthanc pushes a study to the production topology by
  STOW-RS, it is screened, and the SR goes back to Orthanc by STOW-RS.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from db.accounts import add_account
from db.audit import recent_audit
from db.deliveries import DeliveryJob, ScreenedImage
from db.models import DeliveryState, Instance, InstanceState, ResultDelivery
from db.session import make_engine, make_sessionmaker
from dicom_io import events
from dicom_io.sr import read_screening_report
from tests.helpers.dicom_factory import (
    NORMAL_JPEG,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    PNEUMONIA_JPEG,
    chest_dataset,
)
from tests.helpers.orthanc import Orthanc
from tests.helpers.processes import Process, cli_json, free_port, wait_for_port, wait_until
from worker.delivery import SendError
from worker.settings import Settings

TOKEN = "5a8e0c2b9d4f6a1e3c5b7d9f0a2c4e6b"
STOW_SOURCE = "DICOMWEB"
OUT_OF_RESOURCES, STUDY_MISMATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class ApiServer:
    """`create_app` served by uvicorn in a thread of this process, on a free port."""

    def __init__(self, settings: Settings) -> None:
        from worker.api.app import create_app

        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, lifespan="off", http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_port(self.port, timeout=20)
        self.url = f"http://127.0.0.1:{self.port}/dicomweb"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve(tmp_path, database_url) -> Iterator:
    """``serve(**settings)`` starts the API on this test's SQLite database; stopped after the test."""
    started: list[ApiServer] = []

    def start(**settings) -> ApiServer:
        server = ApiServer(Settings(data_dir=tmp_path / "data", database_url=database_url, api_token=TOKEN,
                                    broker_url="memory://", **settings))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def client(url: str, token: str = TOKEN, **kwargs) -> DICOMwebClient:
    stow = DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"}, **kwargs)
    stow.set_http_retry_params(retry=False)
    return stow


def film(jpeg: Path = PNEUMONIA_JPEG, *, study: str) -> Dataset:
    return chest_dataset(jpeg, study_uid=study, transfer_syntax=ExplicitVRLittleEndian, sop_class="CR")


def failures(answer: dict) -> dict[str, int]:
    """ReferencedSOPInstanceUID -> FailureReason of a DICOM JSON Store Instances Response."""
    found = {}
    for item in answer.get("00081198", {}).get("Value", []):
        uid = item.get("00081155", {}).get("Value", [""])[0]
        found[uid] = item["00081197"]["Value"][0]
    return found


def stored(answer: Dataset | dict) -> set[str]:
    if isinstance(answer, dict):
        answer = Dataset.from_json(answer)
    return {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}


def rows(sessions) -> dict[str, Instance]:
    with sessions() as s:
        return {i.SOPInstanceUID: i for i in s.scalars(select(Instance))}


def staged(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "spool").rglob("*.part")]


@pytest.mark.slow  # a server on a port (in this process)
def test_dicomweb_client_stores_a_study_kept_like_a_c_store_and_audited(serve, sessions, tmp_path):
    api = serve()
    study = generate_uid()
    films = [film(PNEUMONIA_JPEG, study=study), film(NORMAL_JPEG, study=study)]
    heard: list[events.InstanceStored] = []
    events.subscribe(heard.append)  # what the audit trail hears
    try:
        # the two films (about 110 KB each) over 200 KB: sent with chunked transfer encoding
        answer = client(api.url, chunk_size=200_000).store_instances(films, study_instance_uid=study)
    finally:
        events.unsubscribe(heard.append)
    assert [(e.SOPInstanceUID, e.peer, e.created) for e in heard] == [
        (str(f.SOPInstanceUID), events.Peer(None, "127.0.0.1"), True) for f in films]
    assert stored(answer) == {str(f.SOPInstanceUID) for f in films}
    assert "FailedSOPSequence" not in answer
    kept = rows(sessions)
    for f in films:
        row = kept[str(f.SOPInstanceUID)]
        assert row.state == InstanceState.RECEIVED and row.calling_ae == STOW_SOURCE
        back = dcmread(row.path)
        assert back.SOPInstanceUID == f.SOPInstanceUID and back.StudyInstanceUID == study
        assert back.pixel_array.shape == f.pixel_array.shape
    assert staged(tmp_path / "data") == []
    # sent again: kept once, still a success
    assert stored(client(api.url).store_instances(films[:1])) == {str(films[0].SOPInstanceUID)}
    assert len(rows(sessions)) == 2
    with sessions() as s:
        entries = [e for e in recent_audit(s) if e["action"].startswith("POST /dicomweb/studies")]
    assert [(e["action"], e["status"], e["result_count"]) for e in entries] == [
        ("POST /dicomweb/studies", 200, 1), ("POST /dicomweb/studies/{study}", 200, 2)]
    assert entries[1]["params"] == {"study": study}


@pytest.mark.slow  # a server on a port (in this process)
def test_each_failure_has_its_reason_and_status(serve, sessions, tmp_path):
    api = serve(dicomweb_max_request_mb=1)
    study, other = generate_uid(), generate_uid()
    mine, theirs = film(NORMAL_JPEG, study=study), film(NORMAL_JPEG, study=other)

    # another study's instance beside one of this study: 202, the one stored, the other 0xA900
    answer = client(api.url).store_instances([mine, theirs], study_instance_uid=study)
    assert stored(answer) == {str(mine.SOPInstanceUID)}
    assert {str(i.ReferencedSOPInstanceUID): i.FailureReason for i in answer.FailedSOPSequence} == {
        str(theirs.SOPInstanceUID): STUDY_MISMATCH}
    assert set(rows(sessions)) == {str(mine.SOPInstanceUID)}

    # only another study's: 409
    with pytest.raises(requests.HTTPError) as refused:
        client(api.url).store_instances([theirs], study_instance_uid=study)
    assert refused.value.response.status_code == 409
    assert failures(refused.value.response.json()) == {str(theirs.SOPInstanceUID): STUDY_MISMATCH}

    # not DICOM: a data set that is no composite instance (no SOP Class), and a JPEG sent as
    # application/dicom (by requests: dicomweb-client encodes data sets only): 409, 0xC000 each,
    # kept in the quarantine with the reason
    bare = Dataset()
    bare.file_meta = FileMetaDataset()
    bare.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bare.PatientName = "NOT^AN^INSTANCE"
    with pytest.raises(requests.HTTPError) as refused:
        client(api.url).store_instances([bare])
    assert refused.value.response.status_code == 409
    assert list(failures(refused.value.response.json()).values()) == [CANNOT_UNDERSTAND]
    jpeg = requests.post(f"{api.url}/studies", data=b"--x\r\nContent-Type: application/dicom\r\n\r\n"
                         + NORMAL_JPEG.read_bytes() + b"\r\n--x--\r\n",
                         headers={"Authorization": f"Bearer {TOKEN}",
                                  "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert jpeg.status_code == 409 and jpeg.headers["Content-Type"] == "application/dicom+json"
    assert list(failures(jpeg.json()).values()) == [CANNOT_UNDERSTAND]
    reasons = list((tmp_path / "data" / "quarantine").rglob("*.reason.txt"))
    assert len(reasons) == 2 and all("not a DICOM instance" in r.read_text() for r in reasons)

    # over the bound (1 MiB, here eleven films): 413 before the body is read, nothing kept
    with pytest.raises(requests.HTTPError) as refused:
        client(api.url, chunk_size=10**8).store_instances([film(PNEUMONIA_JPEG, study=study) for _ in range(11)])
    assert refused.value.response.status_code == 413
    assert set(rows(sessions)) == {str(mine.SOPInstanceUID)} and staged(tmp_path / "data") == []

    # no token, or an account that may not store: refused and audited
    with sessions.begin() as s:
        _, reader = add_account(s, name="dr.ro", role="radiologist")
    for token, status in (("x" * 32, 401), (reader, 403)):
        with pytest.raises(requests.HTTPError) as refused:
            client(api.url, token=token).store_instances([mine])
        assert refused.value.response.status_code == status
    with sessions() as s:
        statuses = [e["status"] for e in recent_audit(s) if e["action"].startswith("POST /dicomweb")]
    assert sorted(statuses) == [202, 401, 403, 409, 409, 409, 413]


@pytest.mark.slow  # a server on a port (in this process)
def test_a_full_spool_answers_A700_for_each_instance_with_503(serve, sessions, tmp_path):
    api = serve(min_free_mb=1 << 40)  # more than any disk: every instance is refused for room
    films = [film(NORMAL_JPEG, study=generate_uid()) for _ in range(2)]
    with pytest.raises(requests.HTTPError) as refused:
        client(api.url).store_instances(films)
    response = refused.value.response
    assert response.status_code == 503 and response.headers["Retry-After"] == "60"
    assert failures(response.json()) == {str(f.SOPInstanceUID): OUT_OF_RESOURCES for f in films}
    assert rows(sessions) == {} and staged(tmp_path / "data") == []


def test_a_chunked_body_past_the_bound_is_cut_off_with_413_and_leaves_nothing(tmp_path, database_url, sessions):
    from fastapi.testclient import TestClient

    from worker.api.app import create_app

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, api_token=TOKEN,
                        broker_url="memory://", dicomweb_max_request_mb=1)
    boundary, study = "b0undary", generate_uid()
    parts = []
    for _ in range(11):  # about 110 KB each
        part = io.BytesIO()
        film(PNEUMONIA_JPEG, study=study).save_as(part, enforce_file_format=True)
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part.getvalue() + b"\r\n")
    closing = f"--{boundary}--\r\n".encode()
    body = b"".join(parts) + closing
    assert len(b"".join(parts[:9])) < 1 << 20 < len(body)

    def chunks(data: bytes):
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]

    headers = {"Authorization": f"Bearer {TOKEN}",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with TestClient(create_app(settings)) as api:
        response = api.post("/dicomweb/studies", content=chunks(body), headers=headers)
        assert response.status_code == 413 and "1048576 bytes at most" in response.json()["detail"]
        assert rows(sessions) == {} and staged(tmp_path / "data") == []
        # nine of them, within the bound, streamed the same way: stored
        response = api.post("/dicomweb/studies", content=chunks(b"".join(parts[:9]) + closing), headers=headers)
        assert response.status_code == 200 and response.headers["content-type"] == "application/dicom+json"
        assert len(stored(response.json())) == 9 == len(rows(sessions))
        # the wrong media type: 415; a body cut before its closing boundary: 400, nothing of it kept
        wrong = api.post("/dicomweb/studies", content=body[:1000],
                         headers={**headers, "Content-Type": "multipart/related; type=application/json; boundary=x"})
        assert wrong.status_code == 415
        cut = api.post("/dicomweb/studies", content=parts[9] + parts[10][:50_000], headers=headers)
        assert cut.status_code == 400 and "closing multipart boundary" in cut.json()["detail"]
        assert len(rows(sessions)) == 9 and staged(tmp_path / "data") == []


def _job(tmp_path: Path, url: str, *, study: str) -> DeliveryJob:
    """A claimed delivery of two screened films (written to ``tmp_path``) to ``url``."""
    images = []
    for jpeg, probability in ((PNEUMONIA_JPEG, 0.91), (NORMAL_JPEG, 0.08)):
        ds = film(jpeg, study=study)
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        images.append(ScreenedImage(str(ds.SOPInstanceUID), str(path), probability, probability >= 0.5, 0.5,
                                    "pneumoscreen-test", "0" * 64))
    return DeliveryJob(id=1, StudyInstanceUID=study, model_version="9.9.9", kind="dicomweb", destination=url,
                       attempts=1, images=tuple(images), AccessionNumber="ACC0001")


@pytest.mark.slow  # servers on ports (in this process)
def test_the_sr_goes_out_by_stow_rs_and_a_refusal_is_a_send_error_with_the_archive_reason(serve, sessions, tmp_path):
    from worker.delivery.dicomweb import DicomwebDestination

    archive = serve()  # pneumoscreen's own STOW-RS intake as the receiving archive
    study = generate_uid()
    job = _job(tmp_path, archive.url, study=study)
    destination = DicomwebDestination(archive.url, token=TOKEN)
    content = destination.build(job)
    assert destination.build(job)[0].SOPInstanceUID == content[0].SOPInstanceUID  # a retry sends the same SR
    receipt = destination.send(content)
    assert receipt.value == content[0].SOPInstanceUID
    assert destination.send(content).value == receipt.value  # sent again: the archive keeps one copy
    [sr] = [row for uid, row in rows(sessions).items() if uid == receipt.value]
    report = read_screening_report(dcmread(sr.path))
    assert report.study_instance_uid == study and report.flagged and report.model_version == "9.9.9"

    with pytest.raises(SendError, match="HTTP 401") as refused:
        DicomwebDestination(archive.url, token="y" * 32).send(content)
    assert not refused.value.transient
    with pytest.raises(SendError, match="no answer") as refused:
        DicomwebDestination(f"http://127.0.0.1:{free_port()}/dicomweb", timeout=5).send(content)
    assert refused.value.transient

    full = serve(min_free_mb=1 << 40)
    with pytest.raises(SendError, match=rf"HTTP 503: {receipt.value}: 0xA700 \(refused: out of resources\)") as refused:
        DicomwebDestination(full.url, token=TOKEN).send(content)
    assert refused.value.transient


def _with_dicomweb(servers: dict | None = None) -> dict:
    """Orthanc configuration keys for its DicomWeb plugin (Debian's orthanc-dicomweb), knowing ``servers``."""
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.fail("Orthanc's DicomWeb plugin is not installed (apt-get install orthanc-dicomweb)")
    return {"Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers or {}}}


def _all(db_url: str, model) -> list:
    """Every row of ``model`` in the database at ``db_url`` (another process's)."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return list(session.scalars(select(model)))
    finally:
        engine.dispose()


@pytest.mark.slow  # Orthanc, the production topology and `pneumoscreen api` as processes
def test_orthanc_pushes_a_study_by_stow_rs_it_is_screened_and_the_sr_comes_back_by_stow_rs(
    tmp_path, pg_url, processes, production
):
    api_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={}, extra_config=_with_dicomweb({
        "pneumoscreen": {"Url": f"http://127.0.0.1:{api_port}/dicomweb/",
                         "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}))
    try:
        env, _, _, _ = production(study_quiet_seconds=0.5, api_token=TOKEN, api_port=api_port,
                                  results_dicomweb_url=f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
        api = Process(["api"], env, tmp_path / "api.log")
        processes.append(api)
        wait_for_port(api_port, api.proc)

        study = generate_uid()
        films = {}
        for jpeg in (PNEUMONIA_JPEG, NORMAL_JPEG):
            ds = film(jpeg, study=study)
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            films[str(ds.SOPInstanceUID)] = orthanc.upload(path)
        [orthanc_study] = {orthanc.get(f"/instances/{i}/study")["ID"] for i in films.values()}
        orthanc.post("/dicom-web/servers/pneumoscreen/stow", {"Resources": [orthanc_study]})

        received = {i.SOPInstanceUID: i for i in _all(pg_url, Instance)}
        assert set(received) == set(films) and {i.calling_ae for i in received.values()} == {STOW_SOURCE}
        screened = wait_until(lambda: (rows := cli_json("instances", env=env)) and all(
            r["state"] == "PREDICTED" for r in rows) and rows, timeout=180, what="the pushed study screened")
        assert {r["sop_instance_uid"] for r in screened} == set(films)

        [sent] = wait_until(lambda: [d for d in _all(pg_url, ResultDelivery) if d.state == DeliveryState.SENT] or None,
                            timeout=120, what="the SR stored in Orthanc by STOW-RS")
        assert (sent.kind, sent.destination) == ("dicomweb", f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
        sr = dcmread(io.BytesIO(orthanc.download(orthanc.instance_id(sent.receipt))))
    finally:
        orthanc.stop()
    report = read_screening_report(sr)
    assert report.study_instance_uid == study and sr.SOPInstanceUID == sent.receipt
    probabilities = {r["sop_instance_uid"]: r["probability"] for r in screened}
    assert {uid for uid, _, _ in report.images} == set(films)
    for uid, probability, _ in report.images:
        assert probability == pytest.approx(probabilities[uid], abs=1e-5)
    for p in processes:
        assert PLANTED_PATIENT_ID not in p.log() and PLANTED_PATIENT_NAME.split("^")[0] not in p.log()
