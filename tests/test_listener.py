"""The listener over real TCP: C-ECHO, C-STORE durability and status codes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

from db.migrate import upgrade
from db.models import InstanceState
from dicom_io.status import StoreStatus
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG, chest_dataset, write_chest_dicom
from tests.helpers.listener import Listener
from tests.helpers.processes import storescu

pytestmark = pytest.mark.slow  # a listener on a port, dcmtk peers


@pytest.fixture
def listener(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    lst = Listener(tmp_path, sqlite_url)
    yield lst
    lst.close()


def send(port: int, ds, *, syntax=ExplicitVRLittleEndian, calling="PYNETDICOM", called="PNEUMOSCREEN"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def test_echoscu_is_answered(listener):
    result = subprocess.run([shutil.which("echoscu"), "-aec", "PNEUMOSCREEN", "127.0.0.1", str(listener.port)],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr


def test_store_writes_file_and_commits_row_before_success(listener):
    ds = chest_dataset(PNEUMONIA_JPEG, sop_class="CR")
    assert send(listener.port, ds) == StoreStatus.SUCCESS
    [instance] = listener.instances()
    assert instance.SOPInstanceUID == ds.SOPInstanceUID
    assert instance.state is InstanceState.RECEIVED
    assert instance.calling_ae == "PYNETDICOM"
    stored = Path(instance.path)
    assert stored == listener.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    back = dcmread(stored)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    assert not list(stored.parent.glob(".incoming-*"))


def test_storescu_jpeg_baseline_is_kept_as_sent(listener, tmp_path):
    ds = write_chest_dicom(tmp_path / "jpeg.dcm", NORMAL_JPEG, transfer_syntax=JPEGBaseline8Bit)
    result = storescu(listener.port, tmp_path / "jpeg.dcm", jpeg_as_is=True)
    assert result.returncode == 0, result.stderr
    [instance] = listener.instances()
    assert instance.TransferSyntaxUID == JPEGBaseline8Bit
    assert dcmread(instance.path).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert instance.SOPInstanceUID == ds.SOPInstanceUID


def test_duplicate_sop_instance_is_stored_once(listener):
    ds = chest_dataset(PNEUMONIA_JPEG)
    assert send(listener.port, ds) == StoreStatus.SUCCESS
    assert send(listener.port, ds) == StoreStatus.SUCCESS
    assert len(listener.instances()) == 1
    assert len(list(listener.spool.root.rglob("*.dcm"))) == 1


def test_store_returns_A700_when_spool_cannot_be_written(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")
    lst = Listener(tmp_path, sqlite_url, spool_root=blocker)
    try:
        assert send(lst.port, chest_dataset(PNEUMONIA_JPEG)) == StoreStatus.OUT_OF_RESOURCES
        assert lst.instances() == []
    finally:
        lst.close()


def test_store_returns_A700_below_free_space_watermark_and_writes_nothing(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    free = shutil.disk_usage(tmp_path).free
    lst = Listener(tmp_path, sqlite_url, min_free_bytes=free + (1 << 30))
    try:
        assert send(lst.port, chest_dataset(PNEUMONIA_JPEG)) == StoreStatus.OUT_OF_RESOURCES
        assert lst.instances() == []
        assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    finally:
        lst.close()


def test_store_returns_A700_and_keeps_no_file_when_database_cannot_record(tmp_path):
    # a database without the schema: the INSERT fails after the bytes were written
    lst = Listener(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert send(lst.port, chest_dataset(PNEUMONIA_JPEG)) == StoreStatus.OUT_OF_RESOURCES
        assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    finally:
        lst.close()


def test_store_without_uids_is_refused_with_C212(listener):
    ds = chest_dataset(PNEUMONIA_JPEG, sop_class="CR")
    ds.StudyInstanceUID = ""
    assert send(listener.port, ds) == StoreStatus.MISSING_UIDS
    [instance] = listener.instances()
    assert instance.state is InstanceState.FAILED and "invalid UID" in instance.reason
    assert instance.series_id is None
    quarantined = Path(instance.path)
    assert quarantined.parent.parent == listener.spool.quarantine_root
    assert "invalid UID" in quarantined.with_suffix(".reason.txt").read_text()
    assert dcmread(quarantined).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(listener.spool.root.rglob("*.dcm"))


def test_calling_ae_outside_the_allow_list_is_rejected_at_association(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    lst = Listener(tmp_path, sqlite_url, allowed_aes=["PACS1"])
    try:
        ds = chest_dataset(PNEUMONIA_JPEG)
        assert send(lst.port, ds, calling="STRANGER") is None
        assert send(lst.port, ds, calling="PACS1") == StoreStatus.SUCCESS
        assert [i.calling_ae for i in lst.instances()] == ["PACS1"]
    finally:
        lst.close()


def test_wrong_called_ae_is_rejected(listener):
    assert send(listener.port, chest_dataset(PNEUMONIA_JPEG), called="SOMEONEELSE") is None
    assert listener.instances() == []


def test_secondary_capture_and_cr_sop_classes_are_accepted(listener):
    for sop_class, uid in (("SC", SecondaryCaptureImageStorage), ("CR", ComputedRadiographyImageStorage)):
        ds = chest_dataset(NORMAL_JPEG, sop_class=sop_class)
        assert ds.SOPClassUID == uid
        assert send(listener.port, ds) == StoreStatus.SUCCESS
    assert len(listener.instances()) == 2


def test_associations_beyond_the_limit_are_refused(tmp_path, sqlite_url):
    upgrade(sqlite_url)
    lst = Listener(tmp_path, sqlite_url, max_associations=1)
    try:
        ds = chest_dataset(PNEUMONIA_JPEG)
        ae = AE(ae_title="FIRST")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        held = ae.associate("127.0.0.1", lst.port, ae_title="PNEUMOSCREEN")
        assert held.is_established
        try:
            assert send(lst.port, ds) is None  # a second one while the first is open
        finally:
            held.release()
        assert send(lst.port, ds) == StoreStatus.SUCCESS
    finally:
        lst.close()


def test_only_decodable_transfer_syntaxes_are_offered(listener):
    from pydicom.uid import MPEG2MPML

    ds = chest_dataset(PNEUMONIA_JPEG)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, MPEG2MPML)
    ae.add_requested_context(ComputedRadiographyImageStorage, JPEGBaseline8Bit)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMOSCREEN")
    try:
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == {JPEGBaseline8Bit}
    finally:
        assoc.release()
