"""The listener's event handlers: short, never raising to the sender, never
running inference. A C-STORE is answered with success only once the bytes
are fsync'd in the spool and the instance row is committed.

Datasets are received in chunks into a temporary file (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``), so a large image never sits in memory; the
handler reads only the header, then moves the file into the spool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.queries import bounded_reason, record_received, record_unreadable
from dicom_io import events
from dicom_io.spool import Spool, valid_uid
from dicom_io.status import EchoStatus, StoreStatus

log = logging.getLogger(__name__)

_HEADER_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber", "Modality",
                    "StudyDate", "PatientID")


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs: where to write and where to record."""

    spool: Spool
    sessions: sessionmaker[Session]
    write_lock: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    """Serializes this process's writes (SQLite: one writer at a time, without busy-waiting)."""
    io: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, thread_name_prefix="spool-io"))
    """Moves and fsyncs received files while the database rows are written."""

    @classmethod
    def for_database(cls, spool: Spool, sessions: sessionmaker[Session]) -> "StoreContext":
        sqlite = sessions.kw["bind"].dialect.name == "sqlite"
        return cls(spool, sessions, threading.Lock() if sqlite else contextlib.nullcontext())


def handle_echo(event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return EchoStatus.SUCCESS


def _read_header(path: Path) -> dict[str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_KEYWORDS))
    return {k: str(ds.get(k, "") or "").strip() for k in _HEADER_KEYWORDS}


def _refuse(context: StoreContext, received: Path, status: StoreStatus, reason: str, *, SOPInstanceUID: str | None,
            SOPClassUID: str, TransferSyntaxUID: str, calling_ae: str | None) -> StoreOutcome:
    """Quarantine what cannot be understood, record it FAILED, answer ``status``."""
    reason = bounded_reason(reason)
    try:
        SOPInstanceUID = valid_uid(SOPInstanceUID or "")
    except ValueError:
        SOPInstanceUID = None
    try:
        quarantined = context.spool.quarantine(received, reason, name=SOPInstanceUID)
        if SOPInstanceUID is not None:
            with context.write_lock, context.sessions.begin() as session:
                record_unreadable(session, SOPInstanceUID=SOPInstanceUID, SOPClassUID=SOPClassUID,
                                  TransferSyntaxUID=TransferSyntaxUID, path=str(quarantined),
                                  size_bytes=quarantined.stat().st_size, calling_ae=calling_ae, reason=reason)
    except (SQLAlchemyError, OSError) as exc:
        log.error("could not quarantine a refused instance: %s", exc)
    log.warning("C-STORE %s from %s refused (0x%04X): %s", SOPInstanceUID, calling_ae, status, reason)
    return StoreOutcome(status, SOPInstanceUID, reason)


@dataclass(frozen=True)
class StoreOutcome:
    """What became of one received file."""

    status: StoreStatus
    SOPInstanceUID: str | None
    reason: str | None = None
    created: bool = False


def store_received(received: Path, context: StoreContext, *, SOPInstanceUID: str | None, SOPClassUID: str,
                   TransferSyntaxUID: str, calling_ae: str | None, peer: events.Peer | None = None) -> StoreOutcome:
    """Move a received file (a temporary file of ours) into the spool and record it.

    The one path for everything that enters: the C-STORE handler, ``pneumoscreen ingest`` and STOW-RS
    (``peer``: who sent it, when not the association of this thread).
    ``StoreStatus.SUCCESS`` only once the bytes are fsync'd and the row is committed.
    """
    size = received.stat().st_size
    try:
        context.spool.check_space(size)
    except OSError as exc:  # SpoolFullError, or the spool folder cannot be made
        log.error("C-STORE %s refused: %s", SOPInstanceUID, exc)
        received.unlink(missing_ok=True)
        return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, SOPInstanceUID, str(exc))

    refuse = {"SOPInstanceUID": SOPInstanceUID, "SOPClassUID": SOPClassUID, "TransferSyntaxUID": TransferSyntaxUID,
              "calling_ae": calling_ae}
    try:
        header = _read_header(received)
    except Exception as exc:  # pydicom raises many types on a malformed stream
        return _refuse(context, received, StoreStatus.CANNOT_UNDERSTAND,
                       f"dataset could not be parsed: {type(exc).__name__}: {exc}", **refuse)
    try:
        final = context.spool.path_for(header["StudyInstanceUID"], header["SeriesInstanceUID"],
                                       header["SOPInstanceUID"])
    except ValueError as exc:
        return _refuse(context, received, StoreStatus.MISSING_UIDS, f"missing or invalid UID: {exc}", **refuse)

    SOPInstanceUID = header["SOPInstanceUID"]
    # the file's fsync (about 2 ms for 2 MB here, more on a slow disk) runs while the rows are written
    adopting = context.io.submit(context.spool.adopt, received, final)
    tmp: Path | None = None
    moved = False
    try:
        with context.write_lock, context.sessions.begin() as session:
            _, created = record_received(
                session, StudyInstanceUID=header["StudyInstanceUID"],
                SeriesInstanceUID=header["SeriesInstanceUID"], SOPInstanceUID=SOPInstanceUID,
                SOPClassUID=SOPClassUID, TransferSyntaxUID=TransferSyntaxUID,
                AccessionNumber=header["AccessionNumber"] or None, Modality=header["Modality"] or None,
                StudyDate=header["StudyDate"] or None, path=str(final), size_bytes=size, calling_ae=calling_ae,
            )
            tmp = adopting.result()  # the bytes are on disk
            if created:
                context.spool.commit(tmp, final)  # named, folder fsync'd, before the row commits
                moved = True
    except (SQLAlchemyError, OSError) as exc:
        log.error("C-STORE %s refused, could not store and record it: %s", SOPInstanceUID, exc)
        if moved:
            final.unlink(missing_ok=True)
        return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, SOPInstanceUID, f"could not store and record it: {exc}")
    finally:
        if tmp is None:
            with contextlib.suppress(OSError):
                tmp = adopting.result()
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    if created:
        log.info("stored %s (%d bytes) from %s", SOPInstanceUID, size, calling_ae)
    else:
        log.info("duplicate %s from %s: already stored, kept once", SOPInstanceUID, calling_ae)
    events.publish(events.InstanceStored(SOPClassUID, SOPInstanceUID, header["StudyInstanceUID"],
                                         header["PatientID"] or None, peer or events.current_peer(), created))
    return StoreOutcome(StoreStatus.SUCCESS, SOPInstanceUID, None if created else "duplicate: already stored", created)


def handle_store(event, context: StoreContext) -> int:
    return store_received(
        Path(event.dataset_path), context, SOPInstanceUID=str(event.request.AffectedSOPInstanceUID),
        SOPClassUID=str(event.request.AffectedSOPClassUID),
        TransferSyntaxUID=str(event.context.transfer_syntax), calling_ae=event.assoc.requestor.ae_title,
    ).status
