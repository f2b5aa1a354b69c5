"""Importing DICOM files from disk (``pneumoscreen ingest FOLDER``): each file
goes through the same store-and-record path as a C-STORE, so it is judged,
screened and kept exactly like an instance a PACS sent. The source folder is
only read, never changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_io.handlers import StoreContext, StoreOutcome, store_received

#: the "calling AE" recorded for imported files
INGEST_SOURCE = "INGEST"

_SKIP_NAMES = {"DICOMDIR"}


def candidate_files(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder`` (recursively, sorted), but hidden files and DICOMDIRs."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.upper() not in _SKIP_NAMES:
                yield Path(root) / name


class FileIdentity(NamedTuple):
    """Who a DICOM file says it is (from its data set, else its file meta information)."""

    SOPInstanceUID: str | None
    SOPClassUID: str
    TransferSyntaxUID: str
    StudyInstanceUID: str | None


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of a DICOM file, or None if it is not a composite instance (not DICOM, a DICOMDIR)."""
    try:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"])
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    sop_uid = str(ds.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "") if meta else ""))
    syntax = str(meta.get("TransferSyntaxUID", "") if meta else "") or "1.2.840.10008.1.2"
    if not sop_class:
        return None  # not a composite instance (a DICOMDIR, a fragment)
    return FileIdentity(sop_uid or None, sop_class, syntax, str(ds.get("StudyInstanceUID", "") or "") or None)


def ingest_file(path: Path, context: StoreContext) -> StoreOutcome | None:
    """Store a copy of ``path`` as if it had been received; None if it is not a DICOM instance."""
    identity = file_identity(path)
    if identity is None:
        return None
    staging = context.spool.root / ".ingest"
    staging.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=staging, suffix=".dcm")
    os.close(fd)
    copy = Path(name)
    try:
        shutil.copyfile(path, copy)
    except OSError:
        copy.unlink(missing_ok=True)
        raise
    try:
        return store_received(copy, context, SOPInstanceUID=identity.SOPInstanceUID,
                              SOPClassUID=identity.SOPClassUID, TransferSyntaxUID=identity.TransferSyntaxUID,
                              calling_ae=INGEST_SOURCE)
    finally:
        copy.unlink(missing_ok=True)  # moved into the spool or quarantine already, unless refused
