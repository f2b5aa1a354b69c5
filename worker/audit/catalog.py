"""The audit events pneumoscreen reports, one builder each, as PS3.15 A.5.3 defines them:
which ActiveParticipants (by role) and ParticipantObjects each carries."""

from __future__ import annotations

from collections.abc import Mapping

from worker.audit.messages import (
    APPLICATION_ACTIVITY, APPLICATION_START, APPLICATION_STOP, EXPORT, ID_NODE, ID_SOP_CLASS_UID, ID_URI,
    INSTANCES_TRANSFERRED, LOGIN, QUERY, ROLE_APPLICATION, ROLE_APPLICATION_LAUNCHER, ROLE_DESTINATION, ROLE_SOURCE,
    SECURITY_ALERT, USER_AUTHENTICATION, AuditSource, Code, Outcome, Participant, ParticipantObject, build,
    patient, study,
)


def application_activity(source: AuditSource, *, started: bool, application: Participant,
                         launcher: str | None = None) -> bytes:
    """A.5.3.1: an application (``application``, role Application) started or stopped."""
    participants = [application]
    if launcher:
        participants.append(Participant(launcher, True, ROLE_APPLICATION_LAUNCHER))
    return build(APPLICATION_ACTIVITY, action="E", outcome=Outcome.SUCCESS, participants=participants,
                 source=source, type_code=APPLICATION_START if started else APPLICATION_STOP)


def instances_transferred(source: AuditSource, *, action: str, outcome: Outcome, sender: Participant,
                          receiver: Participant, StudyInstanceUID: str, sop_classes: Mapping[str, int],
                          PatientID: str | None, description: str | None = None) -> bytes:
    """A.5.3.5: instances of one study moved from ``sender`` to ``receiver`` (C: stored new, R: sent,
    U: stored again)."""
    objects = [study(StudyInstanceUID, sop_classes)]
    if PatientID:
        objects.append(patient(PatientID))
    return build(INSTANCES_TRANSFERRED, action=action, outcome=outcome, source=source, description=description,
                 participants=[_as(sender, ROLE_SOURCE), _as(receiver, ROLE_DESTINATION)], objects=objects)


def query(source: AuditSource, *, outcome: Outcome, requestor: Participant, responder: Participant,
          SOPClassUID: str, identifier: bytes, TransferSyntaxUID: str) -> bytes:
    """A.5.3.10: a C-FIND ``requestor`` sent to ``responder``, with its identifier as sent."""
    obj = ParticipantObject(SOPClassUID, ID_SOP_CLASS_UID, type_code=2, role=3, query=identifier,
                            details={"TransferSyntax": TransferSyntaxUID.encode("ascii")})
    return build(QUERY, action="E", outcome=outcome, source=source, objects=[obj],
                 participants=[_as(requestor, ROLE_SOURCE), _as(responder, ROLE_DESTINATION)])


def user_authentication(source: AuditSource, *, succeeded: bool, user: Participant, node: Participant,
                        description: str | None = None) -> bytes:
    """A.5.3.12: ``user`` signed in to ``node`` (or failed to)."""
    return build(USER_AUTHENTICATION, action="E", outcome=Outcome.SUCCESS if succeeded else Outcome.MINOR_FAILURE,
                 source=source, type_code=LOGIN, description=description, participants=[user, node])


def security_alert(source: AuditSource, *, alert: Code, reporter: Participant, subject: str, description: str,
                   performer: Participant | None = None, subject_is_node: bool = False,
                   outcome: Outcome = Outcome.MINOR_FAILURE) -> bytes:
    """A.5.3.11: ``reporter`` saw ``alert`` about ``subject`` (a node's address, or a resource's URI);
    ``performer`` is who caused it, when known."""
    participants = [reporter] + ([performer] if performer is not None else [])
    obj = ParticipantObject(subject, ID_NODE if subject_is_node else ID_URI, type_code=2, role=13,
                            details={"Alert Description": description.encode("utf-8")})
    return build(SECURITY_ALERT, action="E", outcome=outcome, source=source, type_code=alert,
                 description=description, participants=participants, objects=[obj])


def export(source: AuditSource, *, outcome: Outcome, exporter: Participant, destination: Participant,
           StudyInstanceUID: str, PatientID: str | None = None, description: str | None = None) -> bytes:
    """A.5.3.6: results of a study sent out of the node (HL7, FHIR) to ``destination``."""
    objects = [ParticipantObject(StudyInstanceUID, study(StudyInstanceUID).id_type, type_code=2, role=3,
                                 life_cycle=10)]
    if PatientID:
        objects.append(patient(PatientID))
    return build(EXPORT, action="R", outcome=outcome, source=source, description=description, objects=objects,
                 participants=[_as(exporter, ROLE_SOURCE), _as(destination, ROLE_DESTINATION)])


def _as(participant: Participant, role: Code) -> Participant:
    from dataclasses import replace

    return replace(participant, role=role)


__all__ = ["application_activity", "instances_transferred", "query", "user_authentication", "security_alert",
           "export", "ROLE_APPLICATION"]
