"""DIMSE status codes the listener answers with."""

from __future__ import annotations

import enum


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

    SUCCESS = 0x0000
    """The bytes are on disk (fsync'd) and the instance row is committed."""
    OUT_OF_RESOURCES = 0xA700
    """Refused: no room in the spool (free space below the watermark) or the
    database could not record it; nothing was kept, the sender should retry."""
    CANNOT_UNDERSTAND = 0xC210
    """Refused: the dataset could not be parsed; the bytes are quarantined."""
    MISSING_UIDS = 0xC212
    """Refused: Study, Series or SOP Instance UID missing or invalid; the bytes are quarantined."""


class EchoStatus(enum.IntEnum):
    SUCCESS = 0x0000
    """Verification succeeded."""
