"""The one typed settings object, read from ``PNEUMOSCREEN_*`` environment
variables (and CLI flags), validated at start-up so a bad value fails before
the first association."""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCREEN_", extra="ignore")

    data_dir: Path = Field(Path("./pneumoscreen-data"), description="spool, SQLite database and logs")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in the data dir")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker; `run` uses memory://")
    host: str = Field("127.0.0.1", description="address the DICOM listener binds; off loopback, "
                                               "PNEUMOSCREEN_ALLOWED_AES is required")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the DICOM listener")
    ae_title: str = Field("PNEUMOSCREEN", description="our AE title: called by peers, calling for reports, "
                                                     "C-FIND and C-MOVE (also the move destination)")
    allowed_aes: str = Field("", description="comma-separated calling AE titles; empty = any (loopback only)")
    study_quiet_seconds: float = Field(10.0, ge=0.0, le=86400.0,
                                      description="a study with no new instance for this long is screened")
    model_dir: Path | None = Field(None, description="model artifact folder; default: the shipped model")
    results_destination: str | None = Field(None, description="AET@host:port that receives our DICOM SR; unset = none")
    results_heatmaps: Literal["none", "flagged", "all"] = Field(
        "none", description="also send a Grad-CAM Secondary Capture for these images (loads the model for it)")
    results_max_retries: int = Field(8, ge=0, le=100, description="re-tries of a report the PACS did not take")
    results_claim_seconds: float = Field(900.0, ge=10.0, description="a report still being sent after this long has "
                                         "lost its sender (a killed worker) and is sent again")
    results_timeout_seconds: float = Field(30.0, gt=0, le=3600,
                                           description="seconds a destination may take to take one delivery")
    fhir_base_url: str | None = Field(
        None, description="FHIR R4 base URL (e.g. https://ehr.example.org/fhir) that receives a DiagnosticReport "
                          "per screened study, as a transaction Bundle; unset = none")
    fhir_token: SecretStr | None = Field(None, description="bearer token sent to PNEUMOSCREEN_FHIR_BASE_URL (never "
                                                           "logged nor stored); unset = no Authorization header")
    fhir_ca_bundle: FilePath | None = Field(None, description="CA bundle (PEM) that signed the FHIR server's "
                                                              "certificate (https); default: the system's")
    fhir_patient_identifier_system: str = Field(
        "", description="URI of the patient identifier system of the films' PatientID (the hospital's MRN system) "
                        "in the report's subject; empty = the identifier is sent without a system")
    fhir_accession_identifier_system: str = Field(
        "", description="URI of the RIS's accession number system, in the report's basedOn ServiceRequest "
                        "identifier; empty = without a system")
    results_dicomweb_url: str | None = Field(
        None, description="STOW-RS base URL (e.g. http://pacs:8042/dicom-web) that receives our SR by DICOMweb; "
                          "unset = none")
    results_dicomweb_token: SecretStr | None = Field(
        None, description="bearer token sent to PNEUMOSCREEN_RESULTS_DICOMWEB_URL; unset = no Authorization header")
    dicomweb_max_request_mb: int = Field(256, ge=1, le=1 << 20,
                                         description="largest STOW-RS request POST /dicomweb/studies takes (MiB); "
                                                     "a larger one is answered 413 and nothing of it is kept")
    api_host: str = Field("127.0.0.1", description="address of the HTTP API")
    api_port: int = Field(8080, ge=1, le=65535, description="TCP port of the HTTP API")
    api_token: SecretStr | None = Field(None, description="bearer token the HTTP API requires")
    worklist_order: Literal["probability", "received"] = Field(
        "probability", description="within a priority: highest probability first, or oldest first")
    rescreen_schedule: str = Field("01:00", description="HH:MM when beat rescreens the archive; empty = never")
    rescreen_window_days: int = Field(0, ge=0, description="nightly rescreen: studies received in the last N days "
                                                         "(0 = the whole archive)")
    timezone: str = Field("UTC", description="time zone of the schedules (IANA name, e.g. Europe/Berlin)")
    reconcile_after_seconds: float = Field(300.0, ge=1.0, description="re-send work left in flight this long")
    reconcile_interval_seconds: float = Field(60.0, ge=1.0, description="how often beat runs the reconciler")
    broker_visibility_timeout: float = Field(3600.0, ge=10.0,
                                             description="Redis: an unacknowledged message is delivered again after this")
    prepared_store: Literal["auto", "message"] = Field(
        "auto", description="where prepared images wait for the inference workers: auto, as binary values with a "
                            "time to live in the broker's Redis (the message names them) when the broker is Redis, "
                            "else inside the Celery message; message, always inside the message")
    prepared_ttl_seconds: float = Field(3600.0, ge=10.0, description="a prepared image not used this long is "
                                                                     "dropped (prepared again from the spool if needed)")
    inline_inference: Literal["auto", "yes", "no"] = Field(
        "auto", description="a worker that serves both the preprocess and the inference queue runs the model on "
                            "the films it prepared itself, without a second message; auto: yes")
    min_free_mb: int = Field(512, ge=0, description="refuse C-STORE (0xA700) below this much free spool space")
    max_associations: int = Field(16, ge=1, le=1000, description="concurrent associations per listener process")
    listener_processes: int = Field(1, ge=1, le=64,
                                    description="processes accepting associations on the one DICOM port (Linux)")
    max_pdu_size: int = Field(262144, ge=4096, le=16 << 20,
                              description="largest P-DATA PDU we accept (announced to the peer); a larger one is aborted")
    network_timeout: float = Field(60.0, gt=0, description="seconds of silence, or for one PDU to arrive, before an "
                                                           "association is dropped")
    artim_timeout: float = Field(5.0, gt=0, le=120,
                                 description="seconds a connection has, from its accept, to complete its association")
    max_pending_connections: int = Field(64, ge=1, le=10000,
                                         description="connections not yet associated, per listener process; when "
                                                     "full, the oldest is closed")
    max_host_share: float = Field(0.5, gt=0, le=1,
                                  description="share of PNEUMOSCREEN_MAX_ASSOCIATIONS (and of the pending "
                                              "connections) that one calling address, or one calling AE title, "
                                              "may hold; beyond it A-ASSOCIATE-RJ (transient, local limit exceeded)")
    audit_syslog: str = Field("", description="ATNA audit repository as udp://, tcp:// or tls://host:port (RFC 5424; "
                                             "RFC 5425 octet counting over TCP and TLS); empty = no audit messages")
    audit_tls_ca: Path | None = Field(None, description="CA bundle that signed the audit repository's certificate "
                                                        "(tls://); default: the system's")
    audit_tls_cert: Path | None = Field(None, description="our client certificate (PEM) for the audit repository, "
                                                          "when it asks for one (mutual TLS, as ATNA nodes use)")
    audit_tls_key: Path | None = Field(None, description="the private key (PEM) of PNEUMOSCREEN_AUDIT_TLS_CERT")
    audit_spool_max_messages: int = Field(10000, ge=10, le=10_000_000,
                                          description="audit messages kept on disk while the repository is away; "
                                                      "more are dropped, counted and themselves audited")
    audit_site_id: str = Field("", max_length=64, description="AuditEnterpriseSiteID of our audit messages (the "
                                                              "hospital's name for this site); empty = none")
    api_tls_cert: Path | None = Field(None, description="certificate (PEM) the HTTP API serves TLS with; with it, "
                                                        "HSTS is sent")
    api_tls_key: Path | None = Field(None, description="private key (PEM) of PNEUMOSCREEN_API_TLS_CERT")
    api_header_timeout: float = Field(10.0, gt=0, le=300, description="seconds a client has to send a request's "
                                                                       "line and headers; then the connection is closed")
    api_request_timeout: float = Field(60.0, gt=0, le=3600, description="seconds a request may take, its body "
                                                                         "included; then 503 (or 408 for a body still "
                                                                         "arriving)")
    max_dataset_mb: int = Field(2048, ge=1, le=1 << 20, description="largest data set a C-STORE may bring; a larger "
                                                                   "one is aborted")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables DICOM TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA bundle; when set, clients must present a certificate")
    eligible_modalities: str = Field("CR,DX", description="Modality values screened (also on SC objects)")
    chest_body_parts: str = Field("CHEST,CXR,LUNG,LUNGS,PORTABLE CHEST,THORAX,TORAX",
                                  description="BodyPartExamined values taken as chest, whole or as one word of "
                                              "the value (CHEST_PA); absent is accepted")
    min_image_side: int = Field(128, ge=1, description="smaller images are SKIPPED")
    intended_population: Literal["card", "any"] = Field(
        "card", description="card: films of patients whose age is outside the model card's intended population "
                            "are SKIPPED; any: every age is screened (after the site has validated the model), "
                            "off-population results marked")
    inference_batch_size: int = Field(32, ge=1, le=1024, description="images per forward pass at most")
    inference_batch_ms: float = Field(20.0, ge=0, le=10000, description="wait this long for a batch to fill")
    tf_threads: int = Field(0, ge=0, le=256,
                            description="TensorFlow intra- and inter-op threads (0 = TensorFlow's default)")
    site_sensitivity: float | None = Field(
        None, gt=0.5, lt=1.0,
        description="operations page: the sensitivity the site's threshold is worked out for on its labelled "
                    "sample, and how many labelled studies that needs (as calibrate --sensitivity); default: "
                    "the one the model card's threshold was chosen for, else 0.95")
    drift_window: int = Field(500, ge=30, le=100_000,
                              description="drift check: the last N films the configured model screened, compared "
                                          "with its reference (held-out scores, training films' input statistics)")
    hl7_destination: str | None = Field(None, description="host:port of the RIS that receives an HL7 v2.5.1 ORU^R01 "
                                                          "per screened study over MLLP; unset = none")
    hl7_sending_application: str = Field("PNEUMOSCREEN", max_length=180,
                                         description="MSH-3 of our messages (and of the ACKs the report feed sends)")
    hl7_sending_facility: str = Field("", max_length=180, description="MSH-4 of our messages; empty = none")
    hl7_receiving_application: str = Field("RIS", max_length=180, description="MSH-5: the RIS's application name")
    hl7_receiving_facility: str = Field("", max_length=180, description="MSH-6: the RIS's facility; empty = none")
    hl7_processing_id: Literal["P", "T", "D"] = Field(
        "P", description="MSH-11: P production, T training, D debugging (the RIS may refuse another one)")
    hl7_universal_service: str = Field(
        "PNEUMOSCREEN^Chest X-ray pneumonia screening (AI)^99PNSCR",
        description="OBR-4 of the ORU (code^text^coding system): the procedure as the RIS knows it")
    hl7_patient_id_authority: str = Field("", max_length=64,
                                          description="PID-3 assigning authority when the film's header has no "
                                                      "IssuerOfPatientID; empty = none")
    hl7_listen_port: int | None = Field(None, ge=1, le=65535,
                                        description="MLLP port for the RIS's final reports (ORU^R01), read as "
                                                    "verdicts; unset = off")
    hl7_listen_host: str = Field("127.0.0.1", description="address of the MLLP report listener")
    hl7_allowed_senders: str = Field("", description="comma-separated MSH-3 sending applications the report "
                                                     "listener accepts; empty = any (loopback only)")
    hl7_pneumonia_codes: str = Field("SCT^233604007,RADLEX^RID5350",
                                     description="coded OBX values of a final report that mean pneumonia, "
                                                 "comma-separated CODE or SYSTEM^CODE (OBX-5.1, OBX-5.3)")
    hl7_normal_codes: str = Field("SCT^17621005",
                                  description="coded OBX values of a final report that mean no pneumonia, "
                                              "comma-separated CODE or SYSTEM^CODE")
    hl7_max_message_kb: int = Field(1024, ge=4, le=1 << 20,
                                    description="largest MLLP message the report listener takes (KiB); a larger "
                                                "one closes the connection")

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_aes")
    @classmethod
    def _valid_allowed_aes(cls, value: str) -> str:
        titles = [_check_ae_title(t) for t in value.split(",") if t.strip()]
        return ",".join(titles)

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-z][a-z0-9+]*://", value):
            raise ValueError(f"{value!r} is not a database URL (e.g. postgresql+psycopg://user@host/db)")
        return value or None

    @field_validator("results_destination")
    @classmethod
    def _valid_destination(cls, value: str | None) -> str | None:
        if value and not re.match(r"^[^@]{1,16}@[^:]+:\d{1,5}$", value):
            raise ValueError(f"{value!r} must look like AET@host:port")
        return value or None

    @field_validator("hl7_destination")
    @classmethod
    def _valid_hl7_destination(cls, value: str | None) -> str | None:
        if value and not re.match(r"^[^:@/\s]+:\d{1,5}$", value):
            raise ValueError(f"{value!r} must look like host:port (the RIS's MLLP port)")
        return value or None

    @model_validator(mode="after")
    def _open_report_listener_needs_senders(self) -> "Settings":
        if self.hl7_listen_port is not None and not self.hl7_allowed_senders and not is_loopback(self.hl7_listen_host):
            raise ValueError(f"the HL7 report listener on {self.hl7_listen_host} with no "
                             "PNEUMOSCREEN_HL7_ALLOWED_SENDERS: any sender is accepted only on a loopback address; "
                             "set the RIS's MSH-3 application")
        return self

    @field_validator("results_dicomweb_url", "fhir_base_url")
    @classmethod
    def _valid_dicomweb_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"^https?://[^/@\s]+(/\S*)?$", value):
            raise ValueError(f"{value!r} must be an http:// or https:// URL without credentials (the token has "
                             "its own setting)")
        return value.rstrip("/") if value else None

    @field_validator("rescreen_schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        value = value.strip()
        if value and not re.match(r"^([01]?\d|2[0-3]):[0-5]\d$", value):
            raise ValueError(f"{value!r} must be a time of day as HH:MM (24 h), or empty to turn it off")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone name (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("api_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("PNEUMOSCREEN_API_TOKEN must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> "Settings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both PNEUMOSCREEN_TLS_CERT and PNEUMOSCREEN_TLS_KEY, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("PNEUMOSCREEN_TLS_CLIENT_CA needs PNEUMOSCREEN_TLS_CERT and PNEUMOSCREEN_TLS_KEY")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"PNEUMOSCREEN_{name.upper()}: {path} is not a file")
        return self

    @model_validator(mode="after")
    def _audit_and_api_tls(self) -> "Settings":
        if self.audit_syslog and not re.match(r"^(udp|tcp|tls)://[^:/]+:\d{1,5}$", self.audit_syslog):
            raise ValueError(f"PNEUMOSCREEN_AUDIT_SYSLOG={self.audit_syslog!r} must look like udp://, tcp:// or "
                             "tls://host:port")
        if (self.audit_tls_cert is None) != (self.audit_tls_key is None):
            raise ValueError("set both PNEUMOSCREEN_AUDIT_TLS_CERT and PNEUMOSCREEN_AUDIT_TLS_KEY, or neither")
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ValueError("set both PNEUMOSCREEN_API_TLS_CERT and PNEUMOSCREEN_API_TLS_KEY, or neither")
        for name in ("audit_tls_ca", "audit_tls_cert", "audit_tls_key", "api_tls_cert", "api_tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"PNEUMOSCREEN_{name.upper()}: {path} is not a file")
        return self

    @model_validator(mode="after")
    def _open_listener_needs_allow_list(self) -> "Settings":
        if not self.allowed_aes and not is_loopback(self.host):
            raise ValueError(
                f"listening on {self.host} with no PNEUMOSCREEN_ALLOWED_AES: any AE is accepted only "
                "on a loopback address; set a comma-separated list of calling AE titles"
            )
        return self

    @cached_property
    def allowed_ae_titles(self) -> frozenset[str]:
        return frozenset(t for t in self.allowed_aes.split(",") if t)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def incoming_dir(self) -> Path:
        """Datasets being received: beside the spool, so that storing one is a rename, not a copy."""
        return self.data_dir / "incoming"

    @staticmethod
    def _words(value: str) -> frozenset[str]:
        return frozenset(w.strip().upper() for w in value.split(",") if w.strip())

    @property
    def eligible_modality_set(self) -> frozenset[str]:
        return self._words(self.eligible_modalities)

    @property
    def chest_body_part_set(self) -> frozenset[str]:
        return self._words(self.chest_body_parts)

    @property
    def shares_broker(self) -> bool:
        """True when listener and workers are separate processes joined by a broker and a shared
        database; False on the embedded default (SQLite in the data dir, `run`'s in-process broker)."""
        return self.database_url is not None and not self.broker_url.startswith("memory")

    @property
    def broker_is_redis(self) -> bool:
        return self.broker_url.startswith(("redis://", "rediss://"))

    @property
    def prepared_in_redis(self) -> bool:
        """True when this process leaves the images it prepares in Redis rather than in the messages."""
        return self.prepared_store == "auto" and self.broker_is_redis

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'pneumoscreen.db').resolve()}"
