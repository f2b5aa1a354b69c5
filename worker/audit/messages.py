"""DICOM audit messages (PS3.15 Annex A.5), built with lxml: the XML that goes into each syslog
message. Each builder returns the serialized ``AuditMessage`` document (UTF-8 bytes).

The identifiers each message carries are those A.5.3 asks of the event (UIDs, AE titles, network
addresses, the Patient ID where the data set names one); never a patient's name or birth date.
``audit-message.rnc`` beside this module is the standard's schema; the tests validate every
builder's output against it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import IntEnum

from lxml import etree


@dataclass(frozen=True)
class Code:
    """A coded value: (code, coding scheme, meaning), as ``csd-code``/``codeSystemName``/``originalText``."""

    code: str
    scheme: str
    meaning: str


def dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# PS3.16 CID 400-404 and A.5.3 codes
APPLICATION_ACTIVITY = dcm("110100", "Application Activity")
INSTANCES_TRANSFERRED = dcm("110104", "DICOM Instances Transferred")
EXPORT = dcm("110106", "Export")
SECURITY_ALERT = dcm("110113", "Security Alert")
USER_AUTHENTICATION = dcm("110114", "User Authentication")
QUERY = dcm("110112", "Query")
APPLICATION_START = dcm("110120", "Application Start")
APPLICATION_STOP = dcm("110121", "Application Stop")
LOGIN = dcm("110122", "Login")
NODE_AUTHENTICATION = dcm("110126", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = dcm("110132", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = dcm("110133", "Audit Recording Stopped")
ROLE_APPLICATION = dcm("110150", "Application")
ROLE_APPLICATION_LAUNCHER = dcm("110151", "Application Launcher")
ROLE_DESTINATION = dcm("110152", "Destination Role ID")
ROLE_SOURCE = dcm("110153", "Source Role ID")
ID_STUDY_UID = dcm("110180", "Study Instance UID")
ID_SOP_CLASS_UID = dcm("110181", "SOP Class UID")
ID_NODE = dcm("110182", "Node ID")
ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
ID_URI = Code("12", "RFC-3881", "URI")


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    """Nominal success."""
    MINOR_FAILURE = 4
    """Minor failure: refused, retried, or one of several parts failed."""
    SERIOUS_FAILURE = 8
    """Serious failure: the action did not happen."""
    MAJOR_FAILURE = 12
    """Major failure: the application is now unavailable."""


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, process or node that took part."""

    UserID: str
    UserIsRequestor: bool
    role: Code | None = None
    NetworkAccessPointID: str | None = None
    """An IP address (type 2) or a host name (type 1)."""
    AlternativeUserID: str | None = None
    UserName: str | None = None

    def __post_init__(self) -> None:
        if not self.UserID:
            raise ValueError("an ActiveParticipant needs a UserID")


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study, a patient, a query, a node or a resource."""

    ParticipantObjectID: str
    id_type: Code
    type_code: int
    role: int | None = None
    name: str | None = None
    """ParticipantObjectName; default: ``ParticipantObjectID`` (the schema needs a name or a query)."""
    query: bytes | None = None
    """ParticipantObjectQuery (base64 in the message); exclusive with ``name``."""
    details: Mapping[str, bytes] = field(default_factory=dict)
    """ParticipantObjectDetail type -> value (base64 in the message)."""
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    """SOP Class UID -> number of instances (ParticipantObjectDescription/SOPClass)."""
    life_cycle: int | None = None

    def __post_init__(self) -> None:
        if not self.ParticipantObjectID:
            raise ValueError("a ParticipantObjectIdentification needs a ParticipantObjectID")
        if self.name is not None and self.query is not None:
            raise ValueError("a participant object has a name or a query, not both")


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who reports (our AE title), at which site, as which type of source."""

    AuditSourceID: str
    AuditEnterpriseSiteID: str | None = None
    type_code: str = "4"
    """4: application server process (the listener, the workers); 3: web server process (the API)."""


def _coded(parent: etree._Element, tag: str, code: Code) -> etree._Element:
    return etree.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.scheme,
                                          "originalText": code.meaning})


def _network_type(address: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def _participant(root: etree._Element, p: Participant) -> None:
    attributes = {"UserID": p.UserID, "UserIsRequestor": "true" if p.UserIsRequestor else "false"}
    if p.AlternativeUserID:
        attributes["AlternativeUserID"] = p.AlternativeUserID
    if p.UserName:
        attributes["UserName"] = p.UserName
    if p.NetworkAccessPointID:
        attributes["NetworkAccessPointID"] = p.NetworkAccessPointID
        attributes["NetworkAccessPointTypeCode"] = _network_type(p.NetworkAccessPointID)
    element = etree.SubElement(root, "ActiveParticipant", attributes)
    if p.role is not None:
        _coded(element, "RoleIDCode", p.role)


def _participant_object(root: etree._Element, o: ParticipantObject) -> None:
    attributes = {"ParticipantObjectID": o.ParticipantObjectID, "ParticipantObjectTypeCode": str(o.type_code)}
    if o.role is not None:
        attributes["ParticipantObjectTypeCodeRole"] = str(o.role)
    if o.life_cycle is not None:
        attributes["ParticipantObjectDataLifeCycle"] = str(o.life_cycle)
    element = etree.SubElement(root, "ParticipantObjectIdentification", attributes)
    _coded(element, "ParticipantObjectIDTypeCode", o.id_type)
    if o.query is not None:
        etree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode("ascii")
    else:  # the schema asks for a name or a query: the identifier itself, never a patient's name
        etree.SubElement(element, "ParticipantObjectName").text = o.name or o.ParticipantObjectID
    for kind, value in o.details.items():
        etree.SubElement(element, "ParticipantObjectDetail",
                         {"type": kind, "value": base64.b64encode(value).decode("ascii")})
    if o.sop_classes:
        description = etree.SubElement(element, "ParticipantObjectDescription")
        for uid, count in o.sop_classes.items():
            etree.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})


def build(event: Code, *, action: str, outcome: Outcome, participants: Iterable[Participant], source: AuditSource,
          objects: Iterable[ParticipantObject] = (), type_code: Code | None = None,
          description: str | None = None, when: datetime | None = None) -> bytes:
    """One ``AuditMessage`` in the element order the schema fixes."""
    if action not in ("C", "R", "U", "D", "E"):
        raise ValueError(f"EventActionCode must be one of C, R, U, D, E, got {action!r}")
    participants = list(participants)
    if not participants:
        raise ValueError("an audit message needs at least one ActiveParticipant")
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    root = etree.Element("AuditMessage")
    identification = etree.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": when.isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": str(int(Outcome(outcome)))})
    _coded(identification, "EventID", event)
    if type_code is not None:
        _coded(identification, "EventTypeCode", type_code)
    if description:
        etree.SubElement(identification, "EventOutcomeDescription").text = description
    for participant in participants:
        _participant(root, participant)
    audit_source = {"AuditSourceID": source.AuditSourceID}
    if source.AuditEnterpriseSiteID:
        audit_source["AuditEnterpriseSiteID"] = source.AuditEnterpriseSiteID
    source_element = etree.SubElement(root, "AuditSourceIdentification", audit_source)
    etree.SubElement(source_element, "AuditSourceTypeCode", {"csd-code": source.type_code})
    for participant_object in objects:
        _participant_object(root, participant_object)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def study(StudyInstanceUID: str, sop_classes: Mapping[str, int] | None = None) -> ParticipantObject:
    """The study of an event: system object (2), role report (3), ID type Study Instance UID."""
    return ParticipantObject(StudyInstanceUID, ID_STUDY_UID, type_code=2, role=3, sop_classes=sop_classes or {})


def patient(PatientID: str) -> ParticipantObject:
    """The patient of an event, by Patient ID only (A.5.3 asks for it; the name is optional and left out)."""
    return ParticipantObject(PatientID, ID_PATIENT_NUMBER, type_code=1, role=1)
