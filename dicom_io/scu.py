"""The SCU side: sending results to a PACS (C-STORE) and query/retrieve for
rescreening (Study Root C-FIND and C-MOVE), with pynetdicom.

Every failure is a ``DeliveryError`` saying which peer and which status.
Logs carry UIDs and counts only; no patient attribute is requested.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_io.wire import BoundedAE  # its associations bound what a peer's replies may make us read

from dicom_io import events

log = logging.getLogger(__name__)

_PEER = re.compile(r"(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)")
_STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
_PENDING = frozenset({0xFF00, 0xFF01})
_MAX_CONTEXTS = 128
MAX_FIND_MATCHES = 100_000
"""More C-FIND matches than this for one query end the query: narrow the date range."""


def valid_ae_title(value: str, what: str = "AE title") -> str:
    """``value`` without padding; 1-16 characters, no backslash or control characters."""
    title = str(value).strip()
    if not 1 <= len(title) <= 16 or "\\" in title or any(ord(c) < 32 for c in title):
        raise ValueError(f"{what} must be 1-16 characters without backslash or control characters, got {value!r}")
    return title


@dataclass(frozen=True)
class Peer:
    """A remote DICOM application entity, written ``AET@host:port``."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", valid_ae_title(self.ae_title, "peer AE title"))
        if not self.host:
            raise ValueError("peer host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"peer port must be within 1-65535, got {self.port}")

    @classmethod
    def parse(cls, text: str) -> "Peer":
        """``"PACS@10.0.0.5:104"`` (an IPv6 host in brackets: ``"PACS@[::1]:104"``)."""
        match = _PEER.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"a DICOM peer is written AET@host:port (e.g. PACS@10.0.0.5:104), got {text!r}")
        return cls(match["ae"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class DeliveryError(Exception):
    """A DICOM operation with a peer failed.

    ``transient`` is True for what usually heals by itself: no connection, a
    timeout, an abort, an association rejected as transient, or an "out of
    resources" status (0xA7xx); retry soon with backoff. It is False when the
    peer refused us or what we sent (association rejected as permanent,
    0xA9xx / 0xCxxx / 0x01xx statuses, an unknown move destination): a retry
    succeeds only after someone changes a configuration, so retry later, not
    in a tight loop. ``status`` is the DIMSE status, when there was one.
    """

    def __init__(self, message: str, *, peer: Peer, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        self.transient = transient
        self.status = status


def _status_error(operation: str, peer: Peer, status: int, detail: str = "") -> DeliveryError:
    transient = 0xA700 <= status <= 0xA7FF
    kind = "out of resources" if transient else "refused"
    return DeliveryError(f"{operation} {kind} by {peer} with status 0x{status:04X}{detail}",
                         peer=peer, transient=transient, status=status)


@contextmanager
def _association(peer: Peer, calling_ae: str, contexts: dict[str, list[str]], timeout: float,
                 purpose: str) -> Iterator[Association]:
    """An established association offering ``contexts``, released on leaving."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    ae = BoundedAE(ae_title=valid_ae_title(calling_ae, "calling AE title"))
    for abstract_syntax, transfer_syntaxes in contexts.items():
        ae.add_requested_context(abstract_syntax, transfer_syntaxes)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    answer = assoc.acceptor.primitive  # the peer's A-ASSOCIATE-AC or -RJ, None when it never answered
    if assoc.is_rejected:
        raise DeliveryError(f"{purpose}: {peer} rejected the association from {calling_ae} "
                            f"({answer.result_str}, {answer.source_str}: {answer.reason_str})",
                            peer=peer, transient=answer.result == 0x02)
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    if not assoc.is_established and (answer is None or accepted):
        raise DeliveryError(f"{purpose}: no association with {peer} (connection refused, timed out or aborted)",
                            peer=peer, transient=True)
    try:
        missing = [uid for uid in contexts if uid not in accepted]
        if missing:  # pynetdicom aborts an association without any accepted context
            names = ", ".join(UID(uid).name for uid in missing)
            raise DeliveryError(f"{purpose}: {peer} does not accept {names}", peer=peer, transient=False)
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _no_response(operation: str, peer: Peer) -> DeliveryError:
    return DeliveryError(f"{operation}: no valid response from {peer} (timed out or aborted)",
                         peer=peer, transient=True)


def echo(peer: Peer, *, calling_ae: str, timeout: float = 10) -> None:
    """C-ECHO: raises ``DeliveryError`` unless ``peer`` answers success."""
    with _association(peer, calling_ae, {Verification: [ExplicitVRLittleEndian, ImplicitVRLittleEndian]},
                      timeout, "C-ECHO") as assoc:
        response = assoc.send_c_echo()
        if "Status" not in response:
            raise _no_response("C-ECHO", peer)
        if int(response.Status) != 0x0000:
            raise _status_error("C-ECHO", peer, int(response.Status))


def send_datasets(peer: Peer, datasets: Sequence[Dataset], *, calling_ae: str, timeout: float = 30) -> None:
    """C-STORE every dataset over one association; all must succeed (warnings are logged)."""
    if not datasets:
        return
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        syntax = ds.get("file_meta", Dataset()).get("TransferSyntaxUID")
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID") or syntax is None:
            raise ValueError("a dataset to send needs SOPClassUID, SOPInstanceUID and file_meta.TransferSyntaxUID")
        offered = contexts.setdefault(str(ds.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if syntax not in offered:  # a compressed dataset is sent as it is
            offered.insert(0, str(syntax))
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP classes exceed the {_MAX_CONTEXTS} presentation contexts allowed")

    with _association(peer, calling_ae, contexts, timeout, "C-STORE") as assoc:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            if "Status" not in response:
                raise _no_response(f"C-STORE of {ds.SOPInstanceUID}", peer)
            status = int(response.Status)
            if status in _STORE_WARNINGS:
                log.warning("C-STORE %s to %s: warning 0x%04X", ds.SOPInstanceUID, peer, status)
            elif status != 0x0000:
                raise _status_error(f"C-STORE of {ds.SOPInstanceUID}", peer, status)
    log.info("sent %d instances to %s", len(datasets), peer)


@dataclass(frozen=True)
class StudyMatch:
    """A study found by ``find_studies``; no patient attribute is requested."""

    study_instance_uid: str
    study_date: str | None
    accession_number: str | None
    modalities: tuple[str, ...]


def _date_range(since: datetime.date | None, until: datetime.date | None) -> str:
    """DICOM range matching on StudyDate; an open end is left empty; neither: any date."""
    if since is not None and until is not None and since > until:
        raise ValueError(f"since ({since}) is after until ({until})")
    if since is None and until is None:
        return ""
    return f"{since.strftime('%Y%m%d') if since else ''}-{until.strftime('%Y%m%d') if until else ''}"


def _values(value) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in items if str(v).strip())


def find_studies(peer: Peer, *, calling_ae: str, since: datetime.date | None, until: datetime.date | None,
                 modalities: Sequence[str] = ("CR", "DX"), timeout: float = 30) -> list[StudyMatch]:
    """Study Root C-FIND at STUDY level: studies in the date range holding one of ``modalities``.

    Many PACS match ModalitiesInStudy one value at a time, so there is one query
    per modality, merged by StudyInstanceUID. Sorted by StudyDate, then UID.
    """
    wanted = tuple(dict.fromkeys(str(m).strip().upper() for m in modalities))
    if not wanted or any(not m or len(m) > 16 or "\\" in m for m in wanted):
        raise ValueError(f"modalities must be 1-16 character codes such as CR or DX, got {modalities!r}")
    dates = _date_range(since, until)
    found: dict[str, StudyMatch] = {}
    contexts = {StudyRootQueryRetrieveInformationModelFind: [ExplicitVRLittleEndian, ImplicitVRLittleEndian]}
    with _association(peer, calling_ae, contexts, timeout, "C-FIND") as assoc:
        for modality in wanted:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            query.StudyDate = dates
            query.AccessionNumber = ""
            query.ModalitiesInStudy = modality
            for match in _find(assoc, peer, query):
                uid = str(match.get("StudyInstanceUID", "") or "").strip()
                if not uid:
                    continue
                previous = found.get(uid)
                merged = tuple(sorted({*_values(match.get("ModalitiesInStudy")), modality,
                                       *(previous.modalities if previous else ())}))
                found[uid] = StudyMatch(uid, str(match.get("StudyDate", "") or "") or None,
                                        str(match.get("AccessionNumber", "") or "") or None, merged)
    log.info("C-FIND on %s (%s, StudyDate %s): %d studies", peer, "/".join(wanted), dates or "any", len(found))
    return sorted(found.values(), key=lambda m: (m.study_date or "", m.study_instance_uid))


def _find(assoc: Association, peer: Peer, query: Dataset) -> Iterator[Dataset]:
    """The matches of one C-FIND; the query is published (``dicom_io.events.QuerySent``) for the audit trail."""
    from pynetdicom.dsutils import encode

    succeeded = False
    try:
        yield from _find_matches(assoc, peer, query)
        succeeded = True
    finally:
        events.publish(events.QuerySent(events.Peer(peer.ae_title, peer.host), assoc.requestor.ae_title,
                                        StudyRootQueryRetrieveInformationModelFind, encode(query, False, True) or b"",
                                        succeeded))


def _find_matches(assoc: Association, peer: Peer, query: Dataset) -> Iterator[Dataset]:
    matches = 0
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if "Status" not in status:
            raise _no_response("C-FIND", peer)
        code = int(status.Status)
        if code in _PENDING:
            matches += 1
            if matches > MAX_FIND_MATCHES:
                assoc.abort()
                raise DeliveryError(f"C-FIND: {peer} answered more than {MAX_FIND_MATCHES} matches; "
                                    "query a shorter date range", peer=peer, transient=False)
            if identifier is not None:
                yield identifier
        elif code != 0x0000:
            raise _status_error("C-FIND", peer, code)


@dataclass(frozen=True)
class MoveResult:
    """The C-MOVE sub-operation counts from the final response."""

    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.warning == 0


def move_study(peer: Peer, study_instance_uid: str, *, calling_ae: str, move_destination: str,
               timeout: float = 600) -> MoveResult:
    """Study Root C-MOVE of one study to ``move_destination`` (an AE title the peer knows)."""
    if not UID(study_instance_uid).is_valid:
        raise ValueError(f"not a valid StudyInstanceUID: {study_instance_uid!r}")
    destination = valid_ae_title(move_destination, "move destination")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    contexts = {StudyRootQueryRetrieveInformationModelMove: [ExplicitVRLittleEndian, ImplicitVRLittleEndian]}
    final: Dataset | None = None
    with _association(peer, calling_ae, contexts, timeout, "C-MOVE") as assoc:
        for status, _ in assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove):
            if "Status" not in status:
                raise _no_response(f"C-MOVE of {study_instance_uid}", peer)
            if int(status.Status) not in _PENDING:
                final = status
    if final is None:
        raise _no_response(f"C-MOVE of {study_instance_uid}", peer)
    code = int(final.Status)
    result = MoveResult(int(final.get("NumberOfCompletedSuboperations", 0) or 0),
                        int(final.get("NumberOfFailedSuboperations", 0) or 0),
                        int(final.get("NumberOfWarningSuboperations", 0) or 0))
    if code not in (0x0000, 0xB000):
        detail = " (move destination unknown to the peer)" if code == 0xA801 else ""
        raise _status_error(f"C-MOVE of {study_instance_uid} to {destination}", peer, code, detail)
    log.info("C-MOVE of %s from %s to %s: %d completed, %d failed, %d warnings", study_instance_uid, peer,
             destination, result.completed, result.failed, result.warning)
    return result
