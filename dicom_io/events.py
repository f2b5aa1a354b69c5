"""What the DICOM side reports to whoever listens (the audit trail): instances stored, associations
refused, queries sent. ``dicom_io`` imports nothing from ``worker``; ``worker.audit`` subscribes here.

A subscriber is called in the thread that published (a C-STORE's association thread, say) and must
be quick and never raise: an exception from one is logged and the others still run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """The other end of a DICOM exchange, as ATNA names it: AE title and network address."""

    ae_title: str | None
    address: str | None


@dataclass(frozen=True)
class InstanceStored:
    """A received instance is on disk and its row committed (C-STORE, or an imported file)."""

    SOPClassUID: str
    SOPInstanceUID: str
    StudyInstanceUID: str
    PatientID: str | None
    peer: Peer | None
    """Who sent it; None for a file imported from a folder."""
    created: bool
    """False for a duplicate: already stored, kept once."""


@dataclass(frozen=True)
class AssociationRefused:
    """An association request answered with A-ASSOCIATE-RJ, or a connection closed before one."""

    peer: Peer
    reason: str


@dataclass(frozen=True)
class QuerySent:
    """A C-FIND we sent as SCU."""

    peer: Peer
    calling_ae: str
    SOPClassUID: str
    query: bytes
    """The identifier as sent (encoded data set), for the audit message's ParticipantObjectQuery."""
    succeeded: bool


Event = InstanceStored | AssociationRefused | QuerySent

_lock = threading.Lock()
_subscribers: list[Callable[[Event], None]] = []


def subscribe(callback: Callable[[Event], None]) -> None:
    with _lock:
        if callback not in _subscribers:
            _subscribers.append(callback)


def unsubscribe(callback: Callable[[Event], None]) -> None:
    with _lock:
        if callback in _subscribers:
            _subscribers.remove(callback)


def publish(event: Event) -> None:
    with _lock:
        callbacks = list(_subscribers)
    for callback in callbacks:
        try:
            callback(event)
        except Exception:  # a subscriber's fault must not reach a DICOM peer
            log.exception("a subscriber failed on %s", type(event).__name__)


def current_peer() -> Peer | None:
    """The peer of the association whose thread this is (pynetdicom runs its handlers there), if any."""
    from pynetdicom.association import Association

    assoc = threading.current_thread()
    if not isinstance(assoc, Association):
        return None
    requestor = assoc.requestor
    return Peer(requestor.ae_title or None, requestor.address or None)
