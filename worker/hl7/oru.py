"""The ORU^R01 (HL7 v2.5.1) that tells the RIS a study's screening result, so that it can match the
order and move a flagged study up the reading worklist.

One message per study and model version: PID (the patient ID from the film's header), ORC/OBR with
the accession number (OBR-3 filler order number and OBR-18 placer field 1, as IHE Radiology's
results carry it), the priority (OBR-5 and TQ1-9: ``S`` STAT for a flagged study, ``R`` otherwise),
OBX for the Study Instance UID (DCM 110180), the flag as a coded value, the highest probability, the
threshold and the model, and an NTE saying it is a screening aid. When another model version's result
was sent before, the message is a correction (OBR-25 and OBX-11 ``C``).

The message control ID (MSH-10) is derived from the message's content (everything but MSH-7 and
MSH-10): a retry sends the same message under the same ID; different content gets another ID.
The message is valid against the 2.5.1 ORU_R01 structure (hl7apy, strict) before it is returned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from pydicom import dcmread

from db.deliveries import DeliveryJob
from model.artifact import study_flagged

#: HL7's "locally defined" coding system (99zzz) for our own observation codes
CODING = "99PNSCR"
STUDY_INSTANCE_UID = "110180^Study Instance UID^DCM"
FLAG = f"FLAG^Pneumonia screening result^{CODING}"
PROBABILITY = f"PROB^Pneumonia probability (highest image)^{CODING}"
THRESHOLD = f"THRESH^Operating threshold^{CODING}"
DEVICE = f"DEVICE^Screening model^{CODING}"
SUSPECTED = f"POS^Pneumonia suspected^{CODING}"
NOT_SUSPECTED = f"NEG^Pneumonia not suspected^{CODING}"
SCREENING_AID = ("Computer-aided screening result: an aid to prioritise reading, not a diagnosis. "
                 "The radiologist's report is the result of this study.")
VERSION = "2.5.1"
CONTROL_ID_LENGTH = 20  # MSH-10 is ST(20) in 2.5.1

_SEPARATORS = hl7.parse("MSH|^~\\&|\r")


def escape(value: object) -> str:
    """``value`` as ER7 text: separators and the escape character escaped (HL7 2.5.1 section 2.7)."""
    return _SEPARATORS.escape(str(value)) if value is not None else ""


@dataclass(frozen=True)
class Parties:
    """Who sends and who receives (MSH-3..6), the processing ID (MSH-11) and the site's codes."""

    sending_application: str = "PNEUMOSCREEN"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    processing_id: str = "P"
    #: OBR-4, already in ER7 (code^text^coding system)
    universal_service: str = f"PNEUMOSCREEN^Chest X-ray pneumonia screening (AI)^{CODING}"
    #: PID-3's assigning authority when the film's header names none
    patient_id_authority: str = ""


@dataclass(frozen=True)
class Patient:
    """What the message says of the patient, read from the film's header (never logged)."""

    PatientID: str
    IssuerOfPatientID: str = ""
    PatientName: str = ""
    PatientSex: str = ""
    StudyDateTime: str = ""

    @classmethod
    def from_file(cls, path: str) -> Patient:
        """From the first film's header; ``ValueError`` when it names no patient ID (the RIS cannot match)."""
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["PatientID", "IssuerOfPatientID", "PatientName", "PatientSex", "StudyDate",
                                    "StudyTime"])
        patient_id = str(ds.get("PatientID", "") or "").strip()
        if not patient_id:
            raise ValueError(f"the film {path} has no PatientID: PID-3 is required for the RIS to match")
        date = str(ds.get("StudyDate", "") or "")
        time = str(ds.get("StudyTime", "") or "").split(".")[0]
        return cls(patient_id, str(ds.get("IssuerOfPatientID", "") or ""), str(ds.get("PatientName", "") or ""),
                   str(ds.get("PatientSex", "") or "").upper(), (date + time) if len(date) == 8 else "")


@dataclass(frozen=True)
class OruMessage:
    """A built ORU^R01: its control ID, its text (segments ended by CR) and what it says."""

    control_id: str
    er7: str
    flagged: bool
    corrected: bool

    def encoded(self) -> bytes:
        return self.er7.encode("ascii")


def _xpn(dicom_name: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as HL7 XPN (family^given^middle^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = map(escape, parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _msh(message: Message, parties: Parties, *, timestamp: str, control_id: str) -> None:
    msh = message.msh
    msh.msh_3 = escape(parties.sending_application)
    if parties.sending_facility:
        msh.msh_4 = escape(parties.sending_facility)
    msh.msh_5 = escape(parties.receiving_application)
    if parties.receiving_facility:
        msh.msh_6 = escape(parties.receiving_facility)
    msh.msh_7 = timestamp
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11 = parties.processing_id
    msh.msh_12 = VERSION


def _pid(group, patient: Patient, parties: Parties) -> None:
    pid = group.pid
    pid.pid_1 = "1"
    authority = patient.IssuerOfPatientID or parties.patient_id_authority
    pid.pid_3 = f"{escape(patient.PatientID)}^^^{escape(authority)}^PI"
    if patient.PatientName:
        pid.pid_5 = _xpn(patient.PatientName)
    if patient.PatientSex in {"F", "M", "O"}:
        pid.pid_8 = patient.PatientSex


def _order(group, job: DeliveryJob, patient: Patient, parties: Parties, *, flagged: bool, status: str) -> None:
    accession = escape(job.AccessionNumber or "")
    group.orc.orc_1 = "RE"
    if accession:
        group.orc.orc_3 = accession
    group.orc.orc_5 = "CM"
    obr = group.obr
    obr.obr_1 = "1"
    if accession:
        obr.obr_3 = accession
        obr.obr_18 = accession
    obr.obr_4 = parties.universal_service
    obr.obr_5 = "S" if flagged else "R"
    if patient.StudyDateTime:
        obr.obr_7 = patient.StudyDateTime
    obr.obr_24 = "RAD"
    obr.obr_25 = status


def _notes(job: DeliveryJob) -> list[str]:
    notes = [SCREENING_AID]
    for earlier in job.earlier:
        sent_as = f" (message {earlier.receipt.split()[0]})" if earlier.receipt else ""
        notes.append(f"Corrects the result of model version {earlier.model_version}{sent_as}, which "
                     f"{'flagged' if earlier.flagged else 'did not flag'} the study.")
    notes += sorted({image.population_note for image in job.images if image.population_note})
    return notes


def _observations(job: DeliveryJob, *, flagged: bool, status: str) -> list[tuple[str, str, str, str]]:
    """(value type, identifier, value, abnormal flag) of each OBX, in order."""
    first = job.images[0]
    device = f"{first.model_name} {job.model_version} (weights sha256 {first.weights_sha256[:16]})"
    return [
        ("ST", STUDY_INSTANCE_UID, escape(job.StudyInstanceUID), ""),
        ("CWE", FLAG, SUSPECTED if flagged else NOT_SUSPECTED, "A" if flagged else "N"),
        ("NM", PROBABILITY, f"{max(image.probability for image in job.images):.4f}", ""),
        ("NM", THRESHOLD, f"{first.threshold:.4f}", ""),
        ("ST", DEVICE, escape(device), ""),
    ]


def _assemble(job: DeliveryJob, patient: Patient, parties: Parties, *, timestamp: str, control_id: str) -> Message:
    flagged = study_flagged(image.flagged for image in job.images)
    status = "C" if job.earlier else "P"
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    _msh(message, parties, timestamp=timestamp, control_id=control_id)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT"), patient, parties)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _order(order, job, patient, parties, flagged=flagged, status=status)
    for number, text in enumerate(_notes(job), start=1):
        note = order.add_segment("NTE")
        note.nte_1, note.nte_2, note.nte_3 = str(number), "L", escape(text)
    timing = order.add_group("ORU_R01_TIMING_QTY")
    timing.tq1.tq1_1 = "1"
    timing.tq1.tq1_9 = "S^Stat^HL70485" if flagged else "R^Routine^HL70485"
    equipment = escape(f"{job.images[0].model_name}-{job.model_version}")
    for number, (value_type, identifier, value, abnormal) in enumerate(
            _observations(job, flagged=flagged, status=status), start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1, obx.obx_2, obx.obx_3, obx.obx_5 = str(number), value_type, identifier, value
        if abnormal:
            obx.obx_8 = abnormal
        obx.obx_11 = status
        obx.obx_18 = equipment
    return message


def _hl7_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def build_oru(job: DeliveryJob, parties: Parties, *, patient: Patient | None = None,
              now: datetime | None = None) -> OruMessage:
    """The study's ORU^R01; ``ValueError`` when it cannot be built (no image, no patient ID, a value the
    2.5.1 structure refuses)."""
    if not job.images:
        raise ValueError(f"study {job.StudyInstanceUID} has no screened image to report")
    patient = patient or Patient.from_file(job.images[0].path)
    try:
        blank = _assemble(job, patient, parties, timestamp="19700101000000", control_id="0").to_er7()
        control_id = hashlib.sha256(blank.encode("utf-8")).hexdigest()[:CONTROL_ID_LENGTH]
        message = _assemble(job, patient, parties, timestamp=_hl7_time(now or datetime.now(timezone.utc)),
                            control_id=control_id)
        message.validate()
    except HL7apyException as exc:
        raise ValueError(f"the ORU^R01 does not build: {exc}") from exc
    flagged = study_flagged(image.flagged for image in job.images)
    return OruMessage(control_id, message.to_er7() + "\r", flagged=flagged, corrected=bool(job.earlier))


def validate_oru(text: str) -> Message:
    """``text`` parsed as a 2.5.1 ORU^R01, strict: ``ValueError`` with hl7apy's words when it is not one."""
    from hl7apy.parser import parse_message

    try:
        message = parse_message(text.replace("\n", "\r").strip("\r"), validation_level=VALIDATION_LEVEL.STRICT,
                                find_groups=True)
        message.validate()
    except HL7apyException as exc:
        raise ValueError(f"not a valid ORU^R01: {exc}") from exc
    return message

