"""The spool: every received instance as a file, written atomically, and the
quarantine beside it for what could not be understood or screened.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
and ``<quarantine>/<YYYYMMDD>/<name>.dcm`` with ``<name>.reason.txt``.
A file first gets a temporary name in its final folder and is fsync'd, then
is renamed over its final name and the folder is fsync'd, so a crash never
leaves a half-written instance under a real name; the temporary names carry the
writer's pid, and ``sweep_partial`` removes those whose writer has died.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFullError(OSError):
    """Free space in the spool is below the configured watermark."""


def valid_uid(uid: str) -> str:
    """``uid`` stripped of padding, or ValueError if it is not a DICOM UID."""
    uid = str(uid or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not _UID.match(uid):
        shown = repr(uid[:64]) + (f" (and {len(uid) - 64} more characters)" if len(uid) > 64 else "")
        raise ValueError(f"{shown} is not a valid DICOM UID")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PARTIAL_PREFIX = ".incoming-"
"""``.incoming-<pid>-<random>.part``: a file being brought into the spool by process ``pid``."""


def _writer_alive(name: str) -> bool:
    pid = name[len(PARTIAL_PREFIX):].split("-", 1)[0]
    if not pid.isdigit():
        return False  # named before the writer's pid was part of the name: from an earlier run
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


class Spool:
    def __init__(self, root: str | Path, *, quarantine_root: str | Path | None = None,
                 min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.quarantine_root = Path(quarantine_root) if quarantine_root else self.root.parent / "quarantine"
        self.min_free_bytes = min_free_bytes

    def path_for(self, StudyInstanceUID: str, SeriesInstanceUID: str, SOPInstanceUID: str) -> Path:
        return (self.root / valid_uid(StudyInstanceUID) / valid_uid(SeriesInstanceUID)
                / f"{valid_uid(SOPInstanceUID)}.dcm")

    def check_space(self, incoming_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.min_free_bytes:
            raise SpoolFullError(f"spool {self.root}: {free} bytes free, watermark {self.min_free_bytes}")

    def adopt(self, received: Path, final: Path) -> Path:
        """Bring a received file beside ``final`` under a temporary name, fsync'd.

        A rename when both are on one file system (no copy), a copy otherwise.
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f"{PARTIAL_PREFIX}{os.getpid()}-", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                os.replace(received, tmp)
            except OSError:  # another file system: copy
                shutil.copyfile(received, tmp)
            _fsync_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def sweep_partial(self) -> int:
        """Remove the temporary files of ``adopt`` whose process has died (killed between bringing
        a file in and naming it, so no row refers to them); returns how many."""
        removed = 0
        for root in (self.root, self.quarantine_root):
            for folder, _, names in os.walk(root):
                for name in names:
                    if name.startswith(PARTIAL_PREFIX) and name.endswith(".part") and not _writer_alive(name):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(folder, name))
                            removed += 1
        return removed

    @staticmethod
    def commit(tmp: Path, final: Path) -> None:
        """Rename ``tmp`` over ``final`` and fsync the folder."""
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def quarantine(self, path: Path, reason: str, *, name: str | None = None) -> Path:
        """Move ``path`` into the quarantine with a ``.reason.txt`` beside it; returns the new path."""
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        stem = f"{name or 'unknown'}-{uuid.uuid4().hex[:8]}"
        final = self.quarantine_root / day / f"{stem}.dcm"
        tmp = self.adopt(path, final)
        self.commit(tmp, final)
        reason_file = final.with_suffix(".reason.txt")
        reason_file.write_text(reason + "\n", encoding="utf-8")
        return final
