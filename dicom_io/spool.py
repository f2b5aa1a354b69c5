"""The spool: every received instance as a file, written atomically.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A file is first written to a temporary name in its final folder, fsync'd,
then renamed over its final name and the folder fsync'd, so a crash never
leaves a half-written instance under a real name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFullError(OSError):
    """Free space in the spool is below the configured watermark."""


def _safe_uid(uid: str) -> str:
    uid = uid.strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise ValueError(f"{uid!r} is not a valid DICOM UID")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path, *, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes

    def path_for(self, StudyInstanceUID: str, SeriesInstanceUID: str, SOPInstanceUID: str) -> Path:
        return (self.root / _safe_uid(StudyInstanceUID) / _safe_uid(SeriesInstanceUID)
                / f"{_safe_uid(SOPInstanceUID)}.dcm")

    def check_space(self, incoming_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.min_free_bytes:
            raise SpoolFullError(f"spool {self.root}: {free} bytes free, watermark {self.min_free_bytes}")

    def write_temp(self, final: Path, data: bytes) -> Path:
        """Write ``data`` beside ``final`` under a temporary name and fsync it."""
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    @staticmethod
    def commit(tmp: Path, final: Path) -> None:
        """Rename ``tmp`` over ``final`` and fsync the folder."""
        os.replace(tmp, final)
        _fsync_dir(final.parent)
