"""The listener's event handlers: short, never raising to the sender, never
running inference. A C-STORE is answered with success only once the bytes
are fsync'd in the spool and the instance row is committed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.queries import record_received
from dicom_io.spool import Spool, SpoolFullError
from dicom_io.status import EchoStatus, StoreStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs: where to write and where to record."""

    spool: Spool
    sessions: sessionmaker[Session]


def handle_echo(event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return EchoStatus.SUCCESS


def handle_store(event, context: StoreContext) -> int:
    calling_ae = event.assoc.requestor.ae_title
    try:
        ds = event.dataset
        uids = {k: str(ds.get(k, "") or "").strip() for k in
                ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        accession = str(ds.get("AccessionNumber", "") or "") or None
        modality = str(ds.get("Modality", "") or "") or None
    except Exception as exc:  # pydicom raises many types on a malformed stream
        log.warning("C-STORE from %s: dataset could not be parsed: %s", calling_ae, type(exc).__name__)
        return StoreStatus.CANNOT_UNDERSTAND
    try:
        final = context.spool.path_for(**uids)
    except ValueError as exc:
        log.warning("C-STORE from %s refused: %s", calling_ae, exc)
        return StoreStatus.MISSING_UIDS

    data = event.encoded_dataset(include_meta=True)
    try:
        context.spool.check_space(len(data))
        tmp = context.spool.write_temp(final, data)
    except (SpoolFullError, OSError) as exc:
        log.error("C-STORE %s refused, spool cannot take it: %s", uids["SOPInstanceUID"], exc)
        return StoreStatus.OUT_OF_RESOURCES

    moved = False
    try:
        with context.sessions.begin() as session:
            instance, created = record_received(
                session, **uids, SOPClassUID=str(event.request.AffectedSOPClassUID),
                TransferSyntaxUID=str(event.context.transfer_syntax), AccessionNumber=accession,
                Modality=modality, path=str(final), size_bytes=len(data), calling_ae=calling_ae,
            )
            if created:
                context.spool.commit(tmp, final)
                moved = True
    except (SQLAlchemyError, OSError) as exc:
        log.error("C-STORE %s refused, could not record it: %s", uids["SOPInstanceUID"], exc)
        if moved:
            final.unlink(missing_ok=True)
        return StoreStatus.OUT_OF_RESOURCES
    finally:
        tmp.unlink(missing_ok=True)

    if created:
        log.info("stored %s (%d bytes) from %s", uids["SOPInstanceUID"], len(data), calling_ae)
    else:
        log.info("duplicate %s from %s: already stored, kept once", uids["SOPInstanceUID"], calling_ae)
    return StoreStatus.SUCCESS
