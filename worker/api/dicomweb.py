"""DICOMweb STOW-RS intake (PS3.18 10.5): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}``.

Same guarantees as a C-STORE, by the same code (``dicom_io.handlers.store_received``): an instance is
listed as stored only once its bytes are fsync'd in the spool and its row is committed; the study
assembler then screens it like any other. The body (``multipart/related; type="application/dicom"``) is
parsed as it streams in (python-multipart), each part written to a temporary file beside the spool, never
held in memory; a body over ``PNEUMOSCREEN_DICOMWEB_MAX_REQUEST_MB`` is answered 413 and nothing of it is
kept. The answer is a Store Instances Response (PS3.18 Annex I) in DICOM JSON: every instance in the
Referenced SOP Sequence or, with its Failure Reason, in the Failed SOP Sequence; the HTTP status as
PS3.18 Table 10.5.3-1 says (200 all stored, 202 some, 409 none), and 503 when none was stored because
the spool is full (0xA700 for each), so that the sender tries again later.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydicom import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from db.accounts import Role
from dicom_io import events
from dicom_io.handlers import StoreContext, store_received
from dicom_io.ingest import file_identity
from dicom_io.spool import PARTIAL_PREFIX
from dicom_io.status import StoreStatus
from worker import runtime
from worker.api.auth import BearerAuth, Principal, require_role
from worker.api.schemas import UID_PATTERN, ErrorDetail
from worker.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/dicomweb"
"""Where the DICOMweb routes live; the API's 64 KiB body bound does not apply under it (its own does)."""
STOW_SOURCE = "DICOMWEB"
"""The "calling AE" recorded for instances received by STOW-RS."""
DICOM_JSON = "application/dicom+json"
STAGING = ".stow"
"""Folder under the spool root for parts still arriving (``.incoming-<pid>-*.part``, swept if we die)."""

PS3_10_HEADER = bytes(128) + b"DICM"
"""The preamble and prefix of a DICOM file (PS3.10 7.1)."""


class Failure:
    """Failure Reason (0008,1197) values of PS3.18 Table I.2-2 this service answers, beyond the C-STORE statuses."""

    STUDY_MISMATCH = 0xA900
    """The instance's Study Instance UID is not the one of ``/studies/{study}``."""
    CANNOT_UNDERSTAND = 0xC000
    """The part is not a DICOM instance (PS3.10 file)."""
    TRANSFER_SYNTAX = 0xC122
    """No installed decoder reads the instance's transfer syntax (the listener would not negotiate it)."""


class TooLarge(Exception):
    """The body passed the bound."""


@cache
def _decodable_syntaxes() -> frozenset[str]:
    from dicom_io.server import decodable_transfer_syntaxes

    return frozenset(decodable_transfer_syntaxes())


@dataclass
class Part:
    """One body part, in a temporary file of ours."""

    path: Path
    headers: dict[str, str] = field(default_factory=dict)
    complete: bool = False


class StowBody:
    """A multipart/related body streamed into one temporary file per part, at most ``max_bytes`` in all."""

    def __init__(self, boundary: bytes, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes, self.received = folder, max_bytes, 0
        self.parts: list[Part] = []
        self.ended = False
        self._file: BinaryIO | None = None
        self._head: bytes | None = None
        self._field = self._value = b""
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_end": self._ended,
        })

    def _begin(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=f"{PARTIAL_PREFIX}{os.getpid()}-", suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self._head = b""
        self.parts.append(Part(Path(name)))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._head is None:
            self._file.write(data[start:end])
            return
        self._head += data[start:end]
        if len(self._head) >= len(PS3_10_HEADER):
            self._flush_head()

    def _flush_head(self) -> None:
        """Write the part's first bytes; a data set that begins with its file meta information but no
        preamble (what pydicom writes for a data set that never was a file) gets the PS3.10 preamble."""
        head, self._head = self._head or b"", None
        if head[128:132] != b"DICM" and head[:2] == b"\x02\x00":
            head = PS3_10_HEADER + head
        self._file.write(head)

    def _end(self) -> None:
        self._flush_head()
        self._file.close()
        self._file = None
        self.parts[-1].complete = True

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.parts[-1].headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _ended(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise TooLarge(f"a STOW-RS request may have {self.max_bytes} bytes at most")
        self._parser.write(chunk)

    def discard(self) -> None:
        """Remove every temporary file still ours (those not moved into the spool or the quarantine)."""
        if self._file is not None:
            self._file.close()
        for part in self.parts:
            part.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class InstanceResult:
    """What became of one part: stored (``failure`` None) or not, with the Failure Reason."""

    SOPClassUID: str
    SOPInstanceUID: str
    failure: int | None = None
    reason: str = ""


def store_part(part: Part, context: StoreContext, *, study: str | None, peer: events.Peer | None) -> InstanceResult:
    """Store one received part as a C-STORE would be (``store_received``), or say why not."""
    media_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if media_type != "application/dicom":
        return InstanceResult("", "", Failure.CANNOT_UNDERSTAND, f"a part of type {media_type}, not application/dicom")
    identity = file_identity(part.path)
    if identity is None:  # kept in the quarantine with the reason, as a C-STORE data set that cannot be parsed
        reason = "not a DICOM instance (no PS3.10 file with a SOP Class UID)"
        try:
            context.spool.quarantine(part.path, reason)
        except OSError as exc:
            log.error("STOW-RS: could not quarantine a part that is not DICOM: %s", exc)
        return InstanceResult("", "", Failure.CANNOT_UNDERSTAND, reason)
    uids = (identity.SOPClassUID, identity.SOPInstanceUID or "")
    if study is not None and identity.StudyInstanceUID != study:
        return InstanceResult(*uids, Failure.STUDY_MISMATCH, f"Study Instance UID {identity.StudyInstanceUID} "
                                                             f"is not {study}")
    if identity.TransferSyntaxUID not in _decodable_syntaxes():
        return InstanceResult(*uids, Failure.TRANSFER_SYNTAX,
                              f"transfer syntax {identity.TransferSyntaxUID} cannot be decoded here")
    outcome = store_received(part.path, context, SOPInstanceUID=identity.SOPInstanceUID,
                             SOPClassUID=identity.SOPClassUID, TransferSyntaxUID=identity.TransferSyntaxUID,
                             calling_ae=STOW_SOURCE, peer=peer)
    if outcome.status == StoreStatus.SUCCESS:
        return InstanceResult(identity.SOPClassUID, outcome.SOPInstanceUID or uids[1])
    return InstanceResult(identity.SOPClassUID, outcome.SOPInstanceUID or uids[1], int(outcome.status),
                          outcome.reason or "")


def store_instances(body: StowBody, context: StoreContext, *, study: str | None,
                    peer: events.Peer | None = None) -> list[InstanceResult]:
    """Store every complete part, in order (``peer``: the sender, for the audit trail); the temporary files
    left are removed."""
    try:
        return [store_part(part, context, study=study, peer=peer) for part in body.parts if part.complete]
    finally:
        body.discard()


def store_response(results: list[InstanceResult]) -> tuple[int, Dataset]:
    """The HTTP status and Store Instances Response (PS3.18 Annex I) for ``results``."""
    answer = Dataset()
    answer.RetrieveURL = None  # type 2: no Studies Retrieve service here
    stored, failed = [], []
    for result in results:
        item = Dataset()
        item.ReferencedSOPClassUID = result.SOPClassUID or None
        item.ReferencedSOPInstanceUID = result.SOPInstanceUID or None
        if result.failure is None:
            item.RetrieveURL = None
            stored.append(item)
        else:
            item.FailureReason = result.failure
            failed.append(item)
    if stored:
        answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    if not failed:
        return 200, answer
    if stored:
        return 202, answer
    if all(0xA700 <= r.failure <= 0xA7FF for r in results):
        return 503, answer
    return 409, answer


def _boundary(request: Request) -> bytes:
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/related" or options.get(b"type", b"").lower() != b"application/dicom":
        raise HTTPException(415, 'a STOW-RS request here is multipart/related; type="application/dicom"')
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart/related Content-Type has no boundary")
    return boundary


async def _receive(request: Request, body: StowBody) -> None:
    """Stream the request into ``body``; 413 past the bound, 400 for a body that is not multipart."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > body.max_bytes:
        raise HTTPException(413, f"a STOW-RS request may have {body.max_bytes} bytes at most")
    try:
        async for chunk in request.stream():
            await run_in_threadpool(body.write, chunk)
    except TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except MultipartParseError as exc:
        raise HTTPException(400, f"the body is not a well-formed multipart/related message: {exc}") from None
    except OSError as exc:
        log.error("STOW-RS: could not write a received part: %s", exc)
        raise HTTPException(503, "the received data could not be written; try again later",
                            headers={"Retry-After": "60"}) from None
    if not body.ended:
        raise HTTPException(400, "the body ends before the closing multipart boundary")


def dicomweb_router(auth: BearerAuth, settings: Settings) -> APIRouter:
    """The STOW-RS routes; every request needs the token of an operator or an admin, and is audited."""
    spool = runtime.spool()
    context = StoreContext.for_database(spool, runtime.sessions())
    max_bytes = settings.dicomweb_max_request_mb << 20
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(auth)], tags=["dicomweb"],
                       responses={401: {"model": ErrorDetail, "description": "missing or wrong bearer token"},
                                  403: {"model": ErrorDetail, "description": "the account may not store studies"},
                                  413: {"model": ErrorDetail, "description": "the request is over the bound"},
                                  415: {"model": ErrorDetail, "description": "not multipart/related DICOM"}})
    may_store = require_role(auth, Role.OPERATOR)

    async def stow(request: Request, principal: Principal, study: str | None) -> JSONResponse:
        body = StowBody(_boundary(request), spool.root / STAGING, max_bytes)
        try:
            await _receive(request, body)
        except BaseException:
            body.discard()
            raise
        sender = events.Peer(None, request.client.host if request.client else None)
        results = await run_in_threadpool(store_instances, body, context, study=study, peer=sender)
        if not results:
            raise HTTPException(400, "the request holds no instance")
        status, answer = store_response(results)
        request.state.result_count = sum(r.failure is None for r in results)
        for r in results:
            if r.failure is not None:
                log.warning("STOW-RS %s by %s not stored (0x%04X): %s", r.SOPInstanceUID or "(no UID)",
                            principal.actor, r.failure, r.reason)
        log.info("STOW-RS by %s: %d of %d instance(s) stored", principal.actor, request.state.result_count,
                 len(results))
        return JSONResponse(answer.to_json_dict(), status_code=status, media_type=DICOM_JSON,
                            headers={"Retry-After": "60"} if status == 503 else None)

    @router.post("/studies", summary="Store instances (STOW-RS)", response_class=JSONResponse)
    async def post_studies(request: Request, principal: Principal = Depends(may_store)) -> JSONResponse:
        """PS3.18 Studies Store: instances of any studies, as ``multipart/related; type="application/dicom"``.
        Answers a Store Instances Response in DICOM JSON."""
        return await stow(request, principal, None)

    @router.post("/studies/{study}", summary="Store instances of one study (STOW-RS)", response_class=JSONResponse)
    async def post_study(
        request: Request,
        study: Annotated[str, PathParam(max_length=64, pattern=UID_PATTERN, description="StudyInstanceUID")],
        principal: Principal = Depends(may_store),
    ) -> JSONResponse:
        """As ``POST /dicomweb/studies``; an instance of another study is not stored (Failure Reason 0xA900)."""
        return await stow(request, principal, study)

    return router
