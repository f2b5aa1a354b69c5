"""Report messages from the RIS: each one kept with what became of it, so that none is silently dropped
(an unmatched report waits for an operator, with its reason). Session in, caller commits."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Hl7Report, Study, utcnow
from db.queries import iso_utc


class ReportState(str, enum.Enum):
    """What became of a report message."""

    RECORDED = "RECORDED"
    """Matched to its study (by accession number), its finding recorded as a verdict."""
    UNMATCHED = "UNMATCHED"
    """Read, but no study we received has its accession number."""
    UNREADABLE = "UNREADABLE"
    """Not a report we can read: malformed, no accession number, no finding among the mapped codes."""
    IGNORED = "IGNORED"
    """Not a final report (OBR-25 other than F or C), or one already recorded: nothing to record."""
    REJECTED = "REJECTED"
    """A message we do not take: another message type or version, or a sender not allowed."""


def keep_report(session: Session, *, message: str, state: ReportState | str, ack_code: str,
                reason: str | None = None, sender: str | None = None, control_id: str | None = None,
                accession_number: str | None = None, finding: str | None = None) -> int:
    """Keep a received report message with what became of it; returns its id."""
    report = Hl7Report(message=message, state=ReportState(state).value, ack_code=ack_code, reason=reason,
                       sender=(sender or None) and sender[:128], control_id=(control_id or None) and control_id[:199],
                       accession_number=(accession_number or None) and accession_number[:64], finding=finding,
                       received_at=utcnow())
    session.add(report)
    session.flush()
    return report.id


def already_recorded(session: Session, *, sender: str, control_id: str) -> bool:
    """True when a report with this sender and control ID was already RECORDED (the RIS sent it again)."""
    return session.scalar(select(Hl7Report.id).where(
        Hl7Report.sender == sender[:128], Hl7Report.control_id == control_id[:199],
        Hl7Report.state == ReportState.RECORDED.value).limit(1)) is not None


def studies_with_accession(session: Session, *, accession_number: str) -> list[str]:
    """StudyInstanceUIDs of the received studies with this accession number, oldest first."""
    return list(session.scalars(select(Study.StudyInstanceUID).where(Study.AccessionNumber == accession_number)
                                .order_by(Study.id)))


def list_reports(session: Session, *, state: ReportState | str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Kept report messages, newest first (without the message text, which holds patient data)."""
    stmt = select(Hl7Report).order_by(Hl7Report.id.desc()).limit(limit)
    if state is not None:
        stmt = stmt.where(Hl7Report.state == ReportState(state).value)
    return [{"id": r.id, "received_at": iso_utc(r.received_at), "sender": r.sender, "control_id": r.control_id,
             "accession_number": r.accession_number, "state": r.state, "finding": r.finding, "reason": r.reason,
             "ack_code": r.ack_code} for r in session.scalars(stmt)]
