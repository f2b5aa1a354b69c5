"""The DICOM Conformance Statement (docs/conformance/dicom.md) against the listener it describes.

The statement's tables are parsed as a reader would read them; the transfer syntaxes and storage SOP
classes it lists are negotiated with a running listener (a pynetdicom SCU, one presentation context
each), beside one of each that it does not list, which must be refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ModalityWorklistInformationFind,
    SecondaryCaptureImageStorage,
    Verification,
)

from dicom_io.server import decodable_transfer_syntaxes, make_ae
from tests.helpers.listener import Listener
from worker.runtime import listener_config
from worker.settings import Settings

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance" / "dicom.md"
_UID_CELL = re.compile(r"^\|[^|]*\|\s*`(?P<uid>[0-9.]+)`\s*\|\s*$")
# presentation context results (PS3.8 9.3.3.2)
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x03, 0x04


def listed_uids(heading: str) -> list[str]:
    """The UIDs of the two-column table (name, `UID`) right below ``heading`` in the statement."""
    lines = STATEMENT.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading and line.startswith("#")]
    assert len(starts) == 1, f"the statement has {len(starts)} headings {heading!r}"
    uids, in_table = [], False
    for line in lines[starts[0] + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            in_table = True
            match = _UID_CELL.match(line)
            if match:
                uids.append(match["uid"])
        elif in_table and line.strip():
            break
    assert uids, f"no table of UIDs below {heading!r}"
    assert len(uids) == len(set(uids)), f"a UID is listed twice below {heading!r}"
    return uids


def listed_transfer_syntaxes() -> list[str]:
    return listed_uids("Transfer syntaxes accepted")


def listed_storage_classes() -> list[str]:
    return listed_uids("Storage SOP classes accepted")


def announced_max_pdu() -> int:
    match = re.search(r"\| maximum PDU length received \| (\d+) bytes", STATEMENT.read_text(encoding="utf-8"))
    assert match, "the statement's association policies name no maximum PDU length received"
    return int(match[1])


def unlisted_transfer_syntax() -> str:
    return next(uid for uid in ALL_TRANSFER_SYNTAXES if uid not in listed_transfer_syntaxes())


def test_statement_lists_every_transfer_syntax_and_storage_class_the_listener_accepts():
    ae = make_ae(listener_config(Settings(_env_file=None)))
    storage = {cx.abstract_syntax for cx in ae.supported_contexts} - {Verification}
    assert set(listed_storage_classes()) == storage
    assert listed_transfer_syntaxes() == decodable_transfer_syntaxes()
    for uid in listed_transfer_syntaxes() + listed_storage_classes():
        assert UID(uid).is_valid, uid


def _storage_sample() -> list[str]:
    """The classes that are screened, and every seventh of the rest, in the statement's order."""
    listed = listed_storage_classes()
    screened = [ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage]
    return list(dict.fromkeys(screened + listed[::7]))


@pytest.fixture
def listener(tmp_path, sqlite_url):
    lst = Listener(tmp_path, sqlite_url)
    yield lst
    lst.close()


def _negotiate(port: int, contexts: list[tuple[str, str]]) -> tuple[dict[int, str], dict[int, int], int]:
    """One association offering ``contexts`` (abstract syntax, one transfer syntax) after a Verification
    context: (accepted transfer syntax by context index, rejection result by index, announced max PDU)."""
    ae = AE(ae_title="CONFORMANCE")
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    for abstract_syntax, transfer_syntax in contexts:
        ae.add_requested_context(abstract_syntax, transfer_syntax)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN")
    assert assoc.is_established, "the listener did not accept the association"
    try:
        index = {cx.context_id: i - 1 for i, cx in enumerate(assoc.requestor.requested_contexts)}
        accepted = {index[cx.context_id]: str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        rejected = {index[cx.context_id]: cx.result for cx in assoc.rejected_contexts}
        return accepted, rejected, assoc.acceptor.maximum_length
    finally:
        assoc.release()


@pytest.mark.slow
def test_listener_accepts_every_listed_transfer_syntax_and_refuses_an_unlisted_one(listener):
    syntaxes = listed_transfer_syntaxes() + [unlisted_transfer_syntax()]
    accepted, rejected, max_pdu = _negotiate(listener.port, [(ComputedRadiographyImageStorage, ts) for ts in syntaxes])
    for i, syntax in enumerate(syntaxes[:-1]):
        assert accepted.get(i) == syntax, f"{UID(syntax).name} ({syntax}) is listed but was not accepted"
    assert rejected.get(len(syntaxes) - 1) == TRANSFER_SYNTAXES_NOT_SUPPORTED, \
        f"{UID(syntaxes[-1]).name} is not listed but was not refused"
    assert max_pdu == announced_max_pdu()


@pytest.mark.slow
def test_listener_accepts_listed_storage_classes_and_refuses_an_unlisted_one(listener):
    classes = _storage_sample() + [ModalityWorklistInformationFind]
    assert ModalityWorklistInformationFind not in listed_storage_classes()
    accepted, rejected, _ = _negotiate(listener.port, [(uid, ExplicitVRLittleEndian) for uid in classes])
    for i, uid in enumerate(classes[:-1]):
        assert accepted.get(i) == ExplicitVRLittleEndian, f"{UID(uid).name} ({uid}) is listed but was not accepted"
    assert rejected.get(len(classes) - 1) == ABSTRACT_SYNTAX_NOT_SUPPORTED
