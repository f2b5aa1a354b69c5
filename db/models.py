"""The schema: what has been received, what state each instance is in, and
what each model said about it. The database is the source of truth; the
broker is only a transport."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import Boolean, DateTime, Enum, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class InstanceState(str, enum.Enum):
    """Where a received instance is in the pipeline."""

    RECEIVED = "RECEIVED"
    """On disk in the spool and recorded; its study is still within its quiet period."""
    QUEUED = "QUEUED"
    """Sent to the preprocess queue."""
    PREPROCESSED = "PREPROCESSED"
    """Decoded and prepared; the prepared image is on the inference queue."""
    PREDICTED = "PREDICTED"
    """Terminal: a Prediction row holds the model's probability."""
    SKIPPED = "SKIPPED"
    """Terminal: not eligible for screening (reason says why); the file is kept."""
    FAILED = "FAILED"
    """Terminal: could not be screened (reason says why); the file is kept."""

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({InstanceState.PREDICTED, InstanceState.SKIPPED, InstanceState.FAILED})
#: The states an image is in while still on its way, in pipeline order (the index on state serves them).
OPEN_STATES = tuple(state for state in InstanceState if state not in TERMINAL_STATES)
MAX_NOTE = 160

_state_type = Enum(InstanceState, name="instance_state", native_enum=False, length=16,
                   values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    StudyInstanceUID: Mapped[str] = mapped_column("study_instance_uid", String(64), unique=True)
    AccessionNumber: Mapped[str | None] = mapped_column("accession_number", String(64))
    #: DICOM DA (YYYYMMDD) as sent, for date-range queries
    StudyDate: Mapped[str | None] = mapped_column("study_date", String(8), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    SeriesInstanceUID: Mapped[str] = mapped_column("series_instance_uid", String(64), unique=True)
    Modality: Mapped[str | None] = mapped_column("modality", String(16))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_state_updated", "state", "updated_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: None only for a dataset that could not be parsed (quarantined, FAILED)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    SOPInstanceUID: Mapped[str] = mapped_column("sop_instance_uid", String(64), unique=True)
    SOPClassUID: Mapped[str] = mapped_column("sop_class_uid", String(64))
    TransferSyntaxUID: Mapped[str] = mapped_column("transfer_syntax_uid", String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[InstanceState] = mapped_column(_state_type, default=InstanceState.RECEIVED)
    reason: Mapped[str | None] = mapped_column(Text)
    #: set when it was prepared: its patient is outside, or not known to be within, the model's
    #: intended population (``dicom_io.eligibility``); its result is to be read with that in mind
    population_note: Mapped[str | None] = mapped_column(String(MAX_NOTE))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: when its study was dispatched (the start of the screening latency)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    series: Mapped[Series | None] = relationship(back_populates="instances")
    predictions: Mapped[list["Prediction"]] = relationship(back_populates="instance")


class Prediction(Base):
    """One model's answer for one instance; at most one per (instance, model version)."""

    __tablename__ = "prediction"
    __table_args__ = (UniqueConstraint("instance_id", "model_version", name="uq_prediction_instance_model"),
                      Index("ix_prediction_model_version", "model_version"))

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="predictions")


class ModelVersion(Base):
    """A model that has screened something here: its identity and its card, once per version."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32), unique=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    preprocessing_version: Mapped[str | None] = mapped_column(String(16))
    #: the model card (JSON) as it was when this version first answered
    card: Mapped[str] = mapped_column(Text)
    first_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeliveryState(str, enum.Enum):
    """Where a study's result is on its way to one destination."""

    PENDING = "PENDING"
    """To be sent (new, or the study gained results since the last report)."""
    SENDING = "SENDING"
    """Claimed by a worker that is sending it now."""
    SENT = "SENT"
    """The destination answered success."""
    FAILED = "FAILED"
    """Gave up after the retries; reason says why."""


_delivery_state_type = Enum(DeliveryState, name="delivery_state", native_enum=False, length=16,
                            values_callable=lambda e: [m.value for m in e])


class ResultDelivery(Base):
    """One study's result (for one model version) on its way to one destination of one kind: the DICOM
    SR (and optional heatmaps) by C-STORE or STOW-RS, the ORU^R01 to the RIS, the FHIR DiagnosticReport."""

    __tablename__ = "result_delivery"
    __table_args__ = (
        UniqueConstraint("study_id", "model_version", "kind", "destination", name="uq_delivery_study_model_kind_dest"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(32))
    #: the destination's kind ("dicom", "dicomweb", "hl7", "fhir"): which sender takes it
    kind: Mapped[str] = mapped_column(String(16), default="dicom", server_default="dicom")
    #: the destination's address as its kind writes it (``AET@host:port``, ``host:port``, a URL); no secret
    destination: Mapped[str] = mapped_column(String(512))
    state: Mapped[DeliveryState] = mapped_column(_delivery_state_type, default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    #: what the destination answered for the content last sent: the SR's SOP Instance UID, the HL7
    #: message control ID, the FHIR resource's location; the content's identity is kept across retries
    #: (derived from the content), so a destination stores one copy
    receipt: Mapped[str | None] = mapped_column(Text)
    #: how many screened images the last delivery covered
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AuditEntry(Base):
    """Who looked at what: one row per query of results (HTTP API and command line)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    #: "api:<token fingerprint>" or "cli:<os user>"; never the secret itself
    actor: Mapped[str] = mapped_column(String(128))
    client: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(256))
    #: query parameters as JSON
    params: Mapped[str | None] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    result_count: Mapped[int | None] = mapped_column(Integer)


class Account(Base):
    """A named person or system that signs in: a role, a personal API token and a web password,
    both stored hashed (the token as its SHA-256, the password as an argon2 hash)."""

    __tablename__ = "account"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: "radiologist", "operator" or "admin" (``db.accounts.Role``)
    role: Mapped[str] = mapped_column(String(16))
    #: SHA-256 (hex) of the personal API token; the token itself is shown once and never stored
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: argon2 hash of the web sign-in password; None until one is set
    password_hash: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: set when the account was disabled: its token and its web sessions stop working
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Verdict(Base):
    """One finding recorded for a study, never overwritten: a change is a new row. A radiologist's
    verdict wins over one read from the RIS's final report (``db.verdicts.current_verdicts``)."""

    __tablename__ = "verdict"
    __table_args__ = (Index("ix_verdict_study_source", "study_id", "source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    #: "pneumonia" or "normal" (``db.verdicts.Finding``)
    finding: Mapped[str] = mapped_column(String(16))
    #: "radiologist" or "ris-report" (``db.verdicts.VerdictSource``)
    source: Mapped[str] = mapped_column(String(16))
    #: the account that recorded it (None for a report from the RIS)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("account.id", ondelete="SET NULL"))
    #: who, as the audit log names them ("user:<name>", "api:<token fingerprint>", "ris:<sender>")
    actor: Mapped[str] = mapped_column(String(128))
    #: where it came from beyond the actor (e.g. a report's message control ID); no patient data
    reference: Mapped[str | None] = mapped_column(String(128))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InstanceInput(Base):
    """What a screened film looked like as it went in, recorded when it was prepared: the input
    statistics that drift is watched on (no patient data)."""

    __tablename__ = "instance_input"

    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    #: mean grey level (0-255) of the display image, before the shared preprocessing
    brightness: Mapped[float] = mapped_column(Float)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))


class Hl7Report(Base):
    """A report message the RIS sent over MLLP (an ORU^R01 final report), kept whatever became of it:
    RECORDED as verdicts, or UNMATCHED / UNREADABLE / IGNORED / REJECTED with the reason
    (``db.hl7_reports``). The message is kept as it came, for an operator; it is never logged."""

    __tablename__ = "hl7_report"
    __table_args__ = (Index("ix_hl7_report_state", "state"), Index("ix_hl7_report_accession", "accession_number"),
                      Index("ix_hl7_report_control_id", "control_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: MSH-3^MSH-4 of the sender, as it came
    sender: Mapped[str | None] = mapped_column(String(128))
    #: MSH-10
    control_id: Mapped[str | None] = mapped_column(String(199))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    #: RECORDED, UNMATCHED, UNREADABLE, IGNORED or REJECTED (``db.hl7_reports.ReportState``)
    state: Mapped[str] = mapped_column(String(16))
    finding: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    #: the acknowledgement code we answered (AA, AE, AR)
    ack_code: Mapped[str] = mapped_column(String(2))
    message: Mapped[str] = mapped_column(Text)
