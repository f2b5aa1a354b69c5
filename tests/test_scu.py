"""The SCU against real peers: Orthanc (C-STORE, C-FIND, C-MOVE), dcmtk's
storescp as the move destination, and pynetdicom SCPs answering chosen statuses."""

from __future__ import annotations

import datetime
import io
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicom_io.scu import DeliveryError, MoveResult, Peer, StudyMatch, find_studies, move_study, send_datasets
from dicom_io.sr import AlgorithmInfo, build_heatmap_capture, build_screening_report, read_screening_report
from tests.helpers.dicom_factory import PLANTED_PATIENT_ID, PLANTED_PATIENT_NAME, chest_dataset
from tests.helpers.orthanc import Orthanc
from tests.helpers.processes import free_port, wait_for_port, wait_until

pytestmark = pytest.mark.slow  # Orthanc, storescp and pynetdicom SCPs on ports

CALLING_AE = "PNEUMOSCREEN"
ALGORITHM = AlgorithmInfo(name="pneumonet", version="1.4.2", weights_sha256="ab" * 32, threshold=0.5)


@pytest.fixture(scope="module")
def storescp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, storescp_port) -> Iterator[Orthanc]:
    # Orthanc answers C-FIND and C-MOVE only from the calling AE titles it knows
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), modalities={
        "pneumoscreen": (CALLING_AE, "127.0.0.1", free_port()),
        "storescp": ("STORESCP", "127.0.0.1", storescp_port),
    })
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def peer(orthanc) -> Peer:
    return Peer(orthanc.aet, "127.0.0.1", orthanc.dicom_port)


def upload_study(orthanc: Orthanc, folder: Path, *, study_date: str, series: list[tuple[str, int]]) -> str:
    """A study with one series per (modality, image count), uploaded through the REST API."""
    study_uid = generate_uid()
    for modality, count in series:
        series_uid = generate_uid()
        sop_class = {"CR": "CR", "DX": "DX"}.get(modality, "SC")
        for _ in range(count):
            ds = chest_dataset(sop_class=sop_class, modality=modality, study_uid=study_uid, series_uid=series_uid)
            ds.StudyDate = study_date
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            orthanc.upload(path)
    return study_uid


def test_peer_parses_and_validates():
    assert Peer.parse("PACS@10.0.0.5:104") == Peer("PACS", "10.0.0.5", 104)
    assert Peer.parse(" ORTHANC@pacs.example.org:4242 ") == Peer("ORTHANC", "pacs.example.org", 4242)
    assert Peer.parse("PACS@[::1]:11112") == Peer("PACS", "::1", 11112)
    assert str(Peer.parse("PACS@[::1]:11112")) == "PACS@[::1]:11112"
    for text in ("PACS@host", "pacs.example.org:104", "@host:104", "PACS@:104", "PACS@host:port"):
        with pytest.raises(ValueError, match="AET@host:port|AE title"):
            Peer.parse(text)
    with pytest.raises(ValueError, match="1-16 characters"):
        Peer.parse("A_VERY_LONG_AE_TITLE@host:104")
    with pytest.raises(ValueError, match="1-65535"):
        Peer.parse("PACS@host:70000")


def test_report_and_heatmap_sent_to_orthanc_read_back_through_its_rest_api(orthanc, peer):
    sources = [chest_dataset(), chest_dataset()]
    sources[1].StudyInstanceUID = sources[0].StudyInstanceUID
    report = build_screening_report(sources, [0.83, 0.12], [True, False], algorithm=ALGORITHM,
                                    sop_instance_uid=generate_uid())
    overlay = np.random.default_rng(3).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    heatmap = build_heatmap_capture(sources[0], overlay, algorithm=ALGORITHM, probability=0.83,
                                    sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())

    send_datasets(peer, [report, heatmap], calling_ae=CALLING_AE)

    stored = dcmread(io.BytesIO(orthanc.download(orthanc.instance_id(report.SOPInstanceUID))))
    result = read_screening_report(stored)
    assert stored.SOPClassUID == Comprehensive3DSRStorage
    assert result.study_instance_uid == sources[0].StudyInstanceUID and result.flagged
    assert [(i.sop_instance_uid, i.flagged) for i in result.images] == [(sources[0].SOPInstanceUID, True),
                                                                        (sources[1].SOPInstanceUID, False)]
    assert result.weights_sha256 == ALGORITHM.weights_sha256
    image = hd.imread(io.BytesIO(orthanc.download(orthanc.instance_id(heatmap.SOPInstanceUID))))
    assert image.SOPClassUID == SecondaryCaptureImageStorage
    assert np.array_equal(image.get_frame(1), overlay)


def test_sending_to_a_closed_port_raises_a_transient_delivery_error():
    peer = Peer("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(DeliveryError, match="no association with NOBODY@127.0.0.1") as raised:
        send_datasets(peer, [chest_dataset()], calling_ae=CALLING_AE, timeout=5)
    assert raised.value.transient and raised.value.peer == peer and raised.value.status is None


@pytest.fixture
def status_scp() -> Iterator[callable]:
    """Starts pynetdicom SCPs that answer every C-STORE with a chosen status."""
    servers = []

    def start(status: int, *, called_ae: str = "STATUSSCP") -> Peer:
        ae = AE(ae_title=called_ae)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.require_called_aet = True
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]))
        return Peer(called_ae, "127.0.0.1", port)

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize(("status", "transient"), [(0xA700, True), (0xA7FF, True), (0xC000, False),
                                                   (0xA900, False)])
def test_a_failure_status_raises_a_delivery_error_naming_status_and_peer(status_scp, status, transient):
    peer = status_scp(status)
    with pytest.raises(DeliveryError, match=f"status 0x{status:04X}") as raised:
        send_datasets(peer, [chest_dataset()], calling_ae=CALLING_AE, timeout=10)
    assert str(peer) in str(raised.value)
    assert raised.value.status == status and raised.value.transient is transient


def test_warning_statuses_are_accepted(status_scp, caplog):
    peer = status_scp(0xB000)
    with caplog.at_level(logging.WARNING, logger="dicom_io.scu"):
        send_datasets(peer, [chest_dataset(), chest_dataset()], calling_ae=CALLING_AE, timeout=10)
    assert caplog.text.count("warning 0xB000") == 2


def test_a_rejected_association_raises_a_permanent_delivery_error(status_scp):
    peer = status_scp(0x0000)
    wrong = Peer("SOMEONEELSE", peer.host, peer.port)
    with pytest.raises(DeliveryError, match="rejected the association") as raised:
        send_datasets(wrong, [chest_dataset()], calling_ae=CALLING_AE, timeout=10)
    assert not raised.value.transient


@pytest.mark.parametrize("sop_classes", [("CR",), ("SC", "CR")])
def test_a_sop_class_the_peer_does_not_accept_raises_a_permanent_delivery_error(status_scp, sop_classes):
    peer = status_scp(0x0000)  # accepts Secondary Capture only
    with pytest.raises(DeliveryError, match="does not accept Computed Radiography") as raised:
        send_datasets(peer, [chest_dataset(sop_class=c) for c in sop_classes], calling_ae=CALLING_AE, timeout=10)
    assert not raised.value.transient


def test_find_studies_returns_the_cr_and_dx_studies_in_the_date_range(orthanc, peer, tmp_path, caplog):
    before = upload_study(orthanc, tmp_path, study_date="20240215", series=[("CR", 1)])
    cr = upload_study(orthanc, tmp_path, study_date="20240305", series=[("CR", 1)])
    both = upload_study(orthanc, tmp_path, study_date="20240320", series=[("CR", 1), ("DX", 1)])
    upload_study(orthanc, tmp_path, study_date="20240310", series=[("CT", 1)])
    after = upload_study(orthanc, tmp_path, study_date="20240402", series=[("DX", 1)])

    with caplog.at_level(logging.DEBUG):
        found = find_studies(peer, calling_ae=CALLING_AE, since=datetime.date(2024, 3, 1),
                             until=datetime.date(2024, 3, 31))
    assert found == [StudyMatch(cr, "20240305", "ACC0001", ("CR",)),
                     StudyMatch(both, "20240320", "ACC0001", ("CR", "DX"))]
    assert PLANTED_PATIENT_NAME.split("^")[0] not in caplog.text and PLANTED_PATIENT_ID not in caplog.text

    open_start = find_studies(peer, calling_ae=CALLING_AE, since=None, until=datetime.date(2024, 3, 10))
    assert [m.study_instance_uid for m in open_start] == [before, cr]
    open_end = find_studies(peer, calling_ae=CALLING_AE, since=datetime.date(2024, 3, 21), until=None,
                            modalities=("DX",))
    assert after in [m.study_instance_uid for m in open_end] and both not in [m.study_instance_uid for m in open_end]


def test_find_studies_refuses_an_inverted_date_range(peer):
    with pytest.raises(ValueError, match="is after until"):
        find_studies(peer, calling_ae=CALLING_AE, since=datetime.date(2024, 3, 2), until=datetime.date(2024, 3, 1))


@pytest.fixture
def storescp(tmp_path, storescp_port) -> Iterator[Path]:
    exe = shutil.which("storescp")
    if exe is None:
        pytest.fail("dcmtk's storescp is not installed (apt-get install dcmtk)")
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([exe, "-aet", "STORESCP", "-od", str(out), str(storescp_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_for_port(storescp_port, proc, timeout=20)
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_move_study_delivers_every_instance_to_the_destination(orthanc, peer, tmp_path, storescp):
    study = upload_study(orthanc, tmp_path, study_date="20230101", series=[("CR", 2), ("DX", 1)])

    result = move_study(peer, study, calling_ae=CALLING_AE, move_destination="STORESCP", timeout=60)

    assert result == MoveResult(completed=3, failed=0, warning=0) and result.ok
    files = wait_until(lambda: list(storescp.iterdir()) if len(list(storescp.iterdir())) == 3 else None,
                       timeout=10, interval=0.2, what="three files in storescp's folder")
    assert {dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files} == {study}


def test_move_to_a_destination_the_peer_does_not_know_raises_a_delivery_error(orthanc, peer, tmp_path):
    study = upload_study(orthanc, tmp_path, study_date="20230102", series=[("CR", 1)])
    with pytest.raises(DeliveryError, match="C-MOVE") as raised:
        move_study(peer, study, calling_ae=CALLING_AE, move_destination="UNKNOWNAE", timeout=30)
    assert not raised.value.transient


@pytest.fixture
def find_scp() -> Iterator[callable]:
    """Starts pynetdicom C-FIND SCPs that answer every query with the given identifiers."""
    servers = []

    def start(identifiers: list[Dataset]) -> Peer:
        def answer(event):
            for identifier in identifiers:
                yield 0xFF00, identifier
            yield 0x0000, None

        ae = AE(ae_title="FINDSCP")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, answer)]))
        return Peer("FINDSCP", "127.0.0.1", port)

    yield start
    for server in servers:
        server.shutdown()


def _study_match(**extra) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = generate_uid()
    identifier.StudyDate = "20261101"
    for keyword, value in extra.items():
        setattr(identifier, keyword, value)
    return identifier


def test_a_c_find_answer_too_large_to_hold_is_aborted(find_scp):
    huge = _study_match()
    huge.add_new(0x7FE00010, "OB", bytes(17 << 20))  # 17 MB in one identifier: over what we hold in memory
    peer = find_scp([huge])
    with pytest.raises(DeliveryError, match="no valid response from FINDSCP") as raised:
        find_studies(peer, calling_ae=CALLING_AE, since=None, until=None, modalities=("CR",), timeout=30)
    assert raised.value.transient


def test_a_c_find_with_too_many_matches_is_ended(find_scp, monkeypatch):
    monkeypatch.setattr("dicom_io.scu.MAX_FIND_MATCHES", 5)
    peer = find_scp([_study_match() for _ in range(8)])
    with pytest.raises(DeliveryError, match="more than 5 matches") as raised:
        find_studies(peer, calling_ae=CALLING_AE, since=None, until=None, modalities=("CR",), timeout=30)
    assert not raised.value.transient
    assert len(find_studies(find_scp([_study_match() for _ in range(5)]), calling_ae=CALLING_AE, since=None,
                            until=None, modalities=("CR",), timeout=30)) == 5
