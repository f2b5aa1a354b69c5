"""The one interface every destination of results implements.

A destination of some *kind* (``"dicom"``, ``"dicomweb"``, ``"hl7"``, ``"fhir"``) builds its content from a
claimed :class:`~db.deliveries.DeliveryJob` and sends it, answering a :class:`Receipt` that the delivery row
keeps. Everything else (the row per study, model version and destination; the claim; retries with
backoff; FAILED with the peer's reason; the reconciler after a kill) is written once, in
:mod:`worker.delivery.engine`, and is the same for every kind.

Two rules each destination keeps:

- ``build`` is deterministic: the identity of what it sends (an SR's SOP Instance UID, an HL7 message
  control ID, a FHIR identifier) is derived from the content, so a retry after a kill sends the same
  object again under the same identity and the destination keeps one copy.
- ``send`` raises :class:`SendError` when the peer did not take it, with the peer's own words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from db.deliveries import DeliveryJob


class SendError(Exception):
    """The destination did not take the content; retried with backoff, then FAILED with this text.

    ``transient`` is True for what usually heals by itself (no connection, a timeout, a peer out of
    resources), False when the peer refused the content (a configuration must change first).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Receipt:
    """What the destination answered: ``value`` is stored on the delivery row (an SR's SOP Instance UID,
    an HL7 message control ID, a FHIR resource location); ``summary`` is logged (UIDs and counts, never
    patient data)."""

    value: str
    summary: str = ""
    #: the DICOM objects sent, ``{SOP Class UID: count}`` (for the audit trail); empty for other kinds
    objects: Mapping[str, int] = field(default_factory=dict)


class Destination(ABC):
    """Somewhere a study's result goes. Subclasses set ``kind`` and implement ``build`` and ``send``."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def address(self) -> str:
        """The destination as stored on the delivery row (``AET@host:port``, ``host:port``, a URL): no secret."""

    @abstractmethod
    def build(self, job: DeliveryJob) -> Any:
        """The content for ``job``; raises ``ValueError`` or ``OSError`` when it cannot be built (FAILED at once)."""

    @abstractmethod
    def send(self, content: Any) -> Receipt:
        """Send ``content``; raises :class:`SendError` when the destination did not take it."""

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}"
