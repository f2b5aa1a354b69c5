"""HL7 v2 acknowledgements (original mode, HL7 2.5.1 chapter 2): reading the RIS's ACK to our ORU, and
building ours to the reports it sends.

MSA-1 is AA (accepted), AE (application error: the message was understood but could not be
processed) or AR (application reject: a message we do not take at all, e.g. another type or
version). MSA-3 and ERR-8 carry the text a person reads; ERR-3 the HL7 error code (table 0357).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from worker.hl7.oru import VERSION, escape


class AckCode(str, enum.Enum):
    """MSA-1 (HL7 table 0008), original mode."""

    AA = "AA"
    """Application accept: the message was processed."""
    AE = "AE"
    """Application error: understood, but it could not be processed (the sender may correct and resend)."""
    AR = "AR"
    """Application reject: a message this application does not take (type, version, processing ID)."""


class ErrorCode(str, enum.Enum):
    """ERR-3 (HL7 table 0357), the ones we answer with."""

    SEGMENT_SEQUENCE = "100^Segment sequence error^HL70357"
    REQUIRED_FIELD_MISSING = "101^Required field missing^HL70357"
    DATA_TYPE = "102^Data type error^HL70357"
    UNSUPPORTED_MESSAGE_TYPE = "200^Unsupported message type^HL70357"
    UNSUPPORTED_VERSION = "203^Unsupported version ID^HL70357"
    UNKNOWN_KEY = "204^Unknown key identifier^HL70357"
    APPLICATION_ERROR = "207^Application internal error^HL70357"


@dataclass(frozen=True)
class Ack:
    """What a peer answered: MSA-1, MSA-2 (the control ID it acknowledges) and its text (MSA-3, ERR-8)."""

    code: str
    control_id: str
    text: str
    msa: str

    @classmethod
    def parse(cls, raw: bytes | str) -> Ack:
        """An ACK as the peer sent it; ``ValueError`` when it is not one (no MSH or MSA)."""
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        try:
            message = hl7.parse(text.replace("\n", "\r").strip())
            msa = message.segment("MSA")
        except (KeyError, IndexError, hl7.ParseException) as exc:
            raise ValueError(f"the answer is not an HL7 acknowledgement: {text[:200]!r}") from exc
        words = [message.unescape(str(msa(3)))] if len(msa) > 3 and str(msa(3)) else []
        for err in _segments(message, "ERR"):
            if len(err) > 8 and str(err(8)):
                words.append(message.unescape(str(err(8))))
            elif len(err) > 3 and str(err(3)):
                words.append(message.unescape(str(err(3))))
        return cls(str(msa(1)), str(msa(2)) if len(msa) > 2 else "", "; ".join(words), str(msa))


def _segments(message: hl7.Message, name: str) -> list:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


@dataclass(frozen=True)
class Sender:
    """MSH-3..6 and MSH-9..12 of the message being acknowledged (already ER7, as it came)."""

    application: str = ""
    facility: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = VERSION


def build_ack(code: AckCode, to: Sender, *, application: str, facility: str, control_id: str,
              error: ErrorCode | None = None, text: str = "") -> str:
    """Our ACK^<trigger>^ACK to ``to``'s message, valid against the 2.5.1 ACK structure (save MSA-2 when the
    message's control ID could not be read); AE/AR carry an ERR with ``error`` and ``text`` (also in MSA-3)."""
    ack = Message("ACK", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = ack.msh
    msh.msh_3 = escape(application)
    if facility:
        msh.msh_4 = escape(facility)
    if to.application:
        msh.msh_5 = to.application
    if to.facility:
        msh.msh_6 = to.facility
    msh.msh_7 = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")
    msh.msh_9 = f"ACK^{to.trigger}^ACK" if to.trigger else "ACK"
    msh.msh_10 = control_id
    msh.msh_11 = to.processing_id if to.processing_id in {"P", "T", "D"} else "P"
    msh.msh_12 = VERSION
    ack.msa.msa_1 = AckCode(code).value
    if to.control_id:
        ack.msa.msa_2 = to.control_id
    if text:
        ack.msa.msa_3 = escape(text[:80])
    if code is not AckCode.AA:
        err = ack.add_segment("ERR")
        err.err_3 = (error or ErrorCode.APPLICATION_ERROR).value
        err.err_4 = "E"
        if text:
            err.err_8 = escape(text)
    if to.control_id:  # an ACK to a message whose control ID could not be read has no MSA-2, which 2.5.1 wants
        ack.validate()
    return ack.to_er7() + "\r"
