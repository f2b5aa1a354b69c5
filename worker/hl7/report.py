"""The RIS's final reports (ORU^R01) read as verdicts: matched to the study by accession number, the
finding read from coded OBX values the site names (``PNEUMOSCREEN_HL7_PNEUMONIA_CODES`` /
``PNEUMOSCREEN_HL7_NORMAL_CODES``), stored through :mod:`db.verdicts` as source ``ris-report`` (a
radiologist's verdict wins over it). Every message is kept (:mod:`db.hl7_reports`) with what became of
it, in the same transaction as its verdicts, before it is acknowledged.

Answers (original mode): AA for a report recorded, one already recorded, or one that is not final;
AE for one we understood but could not use (no accession number, no mapped finding, or both findings,
no study with its accession number, malformed); AR for a message we do not take (not ORU^R01, not
version 2.x, a sender not allowed).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import hl7
from sqlalchemy.orm import Session, sessionmaker

from db.hl7_reports import ReportState, already_recorded, keep_report, studies_with_accession
from db.verdicts import Finding, VerdictSource, record_verdict
from worker.hl7.ack import AckCode, ErrorCode, Sender, build_ack

log = logging.getLogger(__name__)

CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF"})
FINAL_STATUSES = frozenset({"F", "C"})


def _codes(value: str) -> frozenset[tuple[str | None, str]]:
    """``CODE`` or ``SYSTEM^CODE``, comma-separated, as (system or None for any, code), upper case."""
    pairs = set()
    for item in (v.strip() for v in value.split(",")):
        if item:
            system, _, code = item.rpartition("^")
            pairs.add((system.upper() or None, code.upper()))
    return frozenset(pairs)


@dataclass(frozen=True)
class CodeMap:
    """Which coded values (OBX-5 of a CE/CWE/CNE observation) mean which finding."""

    pneumonia: frozenset[tuple[str | None, str]]
    normal: frozenset[tuple[str | None, str]]

    @classmethod
    def parse(cls, pneumonia: str, normal: str) -> CodeMap:
        mapping = cls(_codes(pneumonia), _codes(normal))
        if mapping.pneumonia & mapping.normal:
            raise ValueError("a code cannot mean both pneumonia and normal: "
                             f"{sorted(map(str, mapping.pneumonia & mapping.normal))}")
        return mapping

    def _means(self, codes: frozenset, system: str, code: str) -> bool:
        return (system, code) in codes or (None, code) in codes

    def finding(self, coded: list[tuple[str, str]]) -> Finding | None:
        """The finding the (system, code) values say; ``ValueError`` when they say both."""
        found = set()
        for system, code in coded:
            system, code = system.upper(), code.upper()
            if self._means(self.pneumonia, system, code):
                found.add(Finding.PNEUMONIA)
            if self._means(self.normal, system, code):
                found.add(Finding.NORMAL)
        if len(found) > 1:
            raise ValueError("the report's coded values say both pneumonia and normal")
        return found.pop() if found else None


class Unusable(Exception):
    """A report we keep but cannot record: its state, our answer and the reason."""

    def __init__(self, state: ReportState, code: AckCode, error: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.state, self.code, self.error, self.reason = state, code, error, reason


def _value(message: hl7.Message, segment: str, field: int, component: int = 1) -> str:
    """The unescaped component of a segment's field (first segment, first repetition), '' when absent."""
    try:
        return str(message.extract_field(segment, 1, field, 1, component)).strip()
    except (KeyError, IndexError, TypeError):
        return ""


def _coded_values(message: hl7.Message) -> list[tuple[str, str]]:
    """(system, code) of every coded OBX value, its alternate identifier too."""
    coded = []
    try:
        observations = message.segments("OBX")
    except KeyError:
        return []
    for obx in observations:
        if len(obx) <= 5 or str(obx(2)).upper() not in CODED_TYPES:
            continue
        for repetition in obx(5):
            parts = [message.unescape(str(c)).strip() for c in repetition] if isinstance(repetition, hl7.Repetition) \
                else [message.unescape(str(repetition)).strip()]
            parts += [""] * 6
            coded += [(parts[i + 2], parts[i]) for i in (0, 3) if parts[i]]
    return coded


@dataclass(frozen=True)
class Report:
    """A final report as we read it (no patient data)."""

    sender: Sender
    #: who, as a verdict names them: "ris:" and the sending application (MSH-3)
    actor: str
    accession_number: str
    finding: Finding


def _sender(message: hl7.Message) -> Sender:
    msh = message.segment("MSH")
    raw = lambda n: str(msh(n)) if len(msh) > n else ""  # noqa: E731
    trigger = _value(message, "MSH", 9, 2)
    return Sender(application=raw(3), facility=raw(4), trigger=trigger, control_id=raw(10),
                  processing_id=_value(message, "MSH", 11), version=_value(message, "MSH", 12))


def read_report(message: hl7.Message, codes: CodeMap, *, allowed_senders: frozenset[str]) -> Report:
    """The report's accession number and finding; :class:`Unusable` says why there is none to record."""
    sender = _sender(message)
    message_type = (_value(message, "MSH", 9, 1), sender.trigger)
    if message_type != ("ORU", "R01"):
        raise Unusable(ReportState.REJECTED, AckCode.AR, ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                       f"{'^'.join(message_type)} is not taken here: only ORU^R01 final reports")
    if not sender.version.startswith("2."):
        raise Unusable(ReportState.REJECTED, AckCode.AR, ErrorCode.UNSUPPORTED_VERSION,
                       f"HL7 version {sender.version!r} is not taken here: 2.x only")
    application = _value(message, "MSH", 3)
    if allowed_senders and application.upper() not in allowed_senders:
        raise Unusable(ReportState.REJECTED, AckCode.AR, ErrorCode.APPLICATION_ERROR,
                       f"sending application {application!r} is not in PNEUMOSCREEN_HL7_ALLOWED_SENDERS")
    try:
        message.segment("OBR")
    except KeyError:
        raise Unusable(ReportState.UNREADABLE, AckCode.AE, ErrorCode.SEGMENT_SEQUENCE,
                       "no OBR segment: not an ORU^R01 report") from None
    status = _value(message, "OBR", 25)
    if status not in FINAL_STATUSES:
        raise Unusable(ReportState.IGNORED, AckCode.AA, ErrorCode.APPLICATION_ERROR,
                       f"not a final report (OBR-25 {status or 'empty'}): nothing to record")
    accession = next((v for v in (_value(message, "OBR", 18), _value(message, "OBR", 3), _value(message, "ORC", 3))
                      if v), "")
    if not accession:
        raise Unusable(ReportState.UNREADABLE, AckCode.AE, ErrorCode.REQUIRED_FIELD_MISSING,
                       "no accession number (OBR-18, OBR-3 or ORC-3)")
    try:
        finding = codes.finding(_coded_values(message))
    except ValueError as exc:
        raise Unusable(ReportState.UNREADABLE, AckCode.AE, ErrorCode.DATA_TYPE, str(exc)) from None
    if finding is None:
        raise Unusable(ReportState.UNREADABLE, AckCode.AE, ErrorCode.REQUIRED_FIELD_MISSING,
                       "no coded OBX value the site maps to a finding (PNEUMOSCREEN_HL7_PNEUMONIA_CODES, "
                       "PNEUMOSCREEN_HL7_NORMAL_CODES)")
    return Report(sender, f"ris:{application}"[:128], accession[:64], finding)


@dataclass(frozen=True)
class Answer:
    """What we kept and what we answer."""

    state: ReportState
    ack: str
    ack_code: AckCode
    reason: str = ""


def _record(session: Session, report: Report) -> tuple[ReportState, AckCode, ErrorCode | None, str]:
    sender, control_id = report.sender, report.sender.control_id
    who = f"{sender.application}^{sender.facility}"
    if control_id and already_recorded(session, sender=who, control_id=control_id):
        return ReportState.IGNORED, AckCode.AA, None, f"already recorded from message {control_id}"
    studies = studies_with_accession(session, accession_number=report.accession_number)
    if not studies:
        return (ReportState.UNMATCHED, AckCode.AE, ErrorCode.UNKNOWN_KEY,
                "no study received with this accession number")
    for study in studies:
        record_verdict(session, study_instance_uid=study, finding=report.finding, source=VerdictSource.RIS_REPORT,
                       actor=report.actor, reference=control_id[:128] or None)
    log.info("final report %s: %s recorded for %d study(ies) %s", control_id, report.finding.value, len(studies),
             ", ".join(studies))
    return ReportState.RECORDED, AckCode.AA, None, ""


def receive_report(sessions: sessionmaker[Session], raw: bytes, *, codes: CodeMap, allowed_senders: frozenset[str],
                   application: str, facility: str) -> Answer:
    """Read, keep (and record as verdicts) one received message, committed; returns the ACK to answer."""
    text = raw.decode("utf-8", errors="replace")
    ack_id = hashlib.sha256(raw).hexdigest()[:20]
    try:
        message = hl7.parse(text.replace("\n", "\r").strip())
        sender = _sender(message)
    except (hl7.ParseException, KeyError, IndexError, ValueError) as exc:
        reason = f"not an HL7 v2 message: {type(exc).__name__}"
        with sessions.begin() as session:
            keep_report(session, message=text, state=ReportState.UNREADABLE, ack_code="AE", reason=reason)
        log.warning("an unreadable message came in on the report feed (%d bytes); kept", len(raw))
        return Answer(ReportState.UNREADABLE, build_ack(AckCode.AE, Sender(), application=application,
                      facility=facility, control_id=ack_id, error=ErrorCode.SEGMENT_SEQUENCE, text=reason),
                      AckCode.AE, reason)
    accession, finding = None, None
    with sessions.begin() as session:
        try:
            report = read_report(message, codes, allowed_senders=allowed_senders)
            accession, finding = report.accession_number, report.finding.value
            state, code, error, reason = _record(session, report)
        except Unusable as exc:
            state, code, error, reason = exc.state, exc.code, exc.error, exc.reason
        keep_report(session, message=text, state=state, ack_code=code.value, reason=reason or None,
                    sender=f"{sender.application}^{sender.facility}", control_id=sender.control_id,
                    accession_number=accession, finding=finding if state is ReportState.RECORDED else None)
    if state is not ReportState.RECORDED:
        log.warning("report %s kept as %s: %s", sender.control_id, state.value, reason)
    return Answer(state, build_ack(code, sender, application=application, facility=facility, control_id=ack_id,
                                   error=error, text=reason), code, reason)
