"""The IHE ATNA audit trail: DICOM audit messages (PS3.15 A.5) sent as RFC 5424 syslog messages to
``PNEUMOSCREEN_AUDIT_SYSLOG``, through a bounded spool on disk that outlasts a repository away.

Each entry point calls :func:`start` once (``pneumoscreen listen``, its receivers, ``run``, ``worker``,
``api``): it reports Application Start, subscribes to what the DICOM side publishes
(``dicom_io.events``: instances stored, associations refused, queries sent) and reports Application
Stop when the process exits. The rest of the code reports through the functions here, each a no-op
while the trail is off (``PNEUMOSCREEN_AUDIT_SYSLOG`` empty):

- :func:`user_authentication` (web sign-in), :func:`refused_token` (Security Alert, API),
- :func:`export_event` (a delivery's outcome: HL7/FHIR as Export, DICOM SR/STOW as DICOM Instances
  Transferred).

Nothing here raises into its caller: a message that cannot be built or kept is logged and counted.
"""

from __future__ import annotations

import atexit
import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from dicom_io import events
from worker.audit import catalog
from worker.audit.messages import (
    AUDIT_RECORDING_STOPPED, NODE_AUTHENTICATION, ROLE_APPLICATION, USE_OF_RESTRICTED_FUNCTION, AuditSource, Outcome,
    Participant,
)
from worker.audit.sink import Repository, SyslogSender, syslog_message
from worker.audit.spool import AuditSpool
from worker.settings import Settings

log = logging.getLogger(__name__)

ALERT_INTERVAL = 10.0
"""Seconds between two Security Alerts about refused associations from one address (the ones between
are counted into the next)."""


def _dicom_participant(ae_title: str | None, address: str | None, *, requestor: bool) -> Participant:
    return Participant(ae_title or address or "unknown", requestor, NetworkAccessPointID=address,
                       AlternativeUserID=f"AETITLES={ae_title}" if ae_title else None)


class AuditTrail:
    """This process's audit trail: who we are in the messages, and the spool they go through."""

    def __init__(self, settings: Settings, application: str, *, spool_root: Path | None = None) -> None:
        repository = Repository.parse(settings.audit_syslog, ca_file=settings.audit_tls_ca,
                                      cert_file=settings.audit_tls_cert, key_file=settings.audit_tls_key)
        self.settings = settings
        self.application = application
        self.hostname = socket.gethostname()
        self.source = AuditSource(settings.ae_title, settings.audit_site_id or None,
                                  type_code="3" if application == "api" else "4")
        self.node = Participant(settings.ae_title, False, NetworkAccessPointID=self.hostname,
                                AlternativeUserID=f"AETITLES={settings.ae_title}")
        self._sender = SyslogSender(repository)
        self.spool = AuditSpool(spool_root or settings.data_dir / "audit",
                                max_messages=settings.audit_spool_max_messages, send=self._sender.send,
                                report_drops=self._drops_message)
        self._alerts: dict[str, tuple[float, int]] = {}
        self._alerts_lock = threading.Lock()
        log.info("audit trail to %s (spool %s)", repository, self.spool.folder)

    def emit(self, xml: bytes) -> bool:
        return self.spool.put(syslog_message(xml, hostname=self.hostname))

    def _drops_message(self, dropped: int) -> bytes:
        description = (f"{dropped} audit message(s) were dropped: the audit spool was full "
                       f"({self.spool.max_messages} messages) while the repository was unreachable")
        xml = catalog.security_alert(self.source, alert=AUDIT_RECORDING_STOPPED, reporter=self.node,
                                     subject=f"file://{self.hostname}{self.spool.folder}", description=description)
        return syslog_message(xml, hostname=self.hostname)

    def application_activity(self, *, started: bool) -> None:
        application = Participant(f"pneumoscreen {self.application}", False, ROLE_APPLICATION,
                                  NetworkAccessPointID=self.hostname,
                                  AlternativeUserID=f"AETITLES={self.source.AuditSourceID} PID={os.getpid()}")
        try:
            launcher = getpass.getuser()
        except (KeyError, OSError):
            launcher = None
        self.emit(catalog.application_activity(self.source, started=started, application=application,
                                               launcher=launcher))

    def on_dicom_event(self, event: events.Event) -> None:
        if isinstance(event, events.InstanceStored):
            peer = event.peer
            sender = (_dicom_participant(peer.ae_title, peer.address, requestor=True) if peer is not None
                      else Participant("import", True))
            self.emit(catalog.instances_transferred(
                self.source, action="C" if event.created else "U", outcome=Outcome.SUCCESS, sender=sender,
                receiver=self.node, StudyInstanceUID=event.StudyInstanceUID,
                sop_classes={event.SOPClassUID: 1}, PatientID=event.PatientID,
                description=None if event.created else "already stored: kept once"))
        elif isinstance(event, events.AssociationRefused):
            self._refused(event)
        elif isinstance(event, events.QuerySent):
            self.emit(catalog.query(
                self.source, outcome=Outcome.SUCCESS if event.succeeded else Outcome.MINOR_FAILURE,
                requestor=_dicom_participant(event.calling_ae, self.hostname, requestor=True),
                responder=_dicom_participant(event.peer.ae_title, event.peer.address, requestor=False),
                SOPClassUID=event.SOPClassUID, identifier=event.query,
                TransferSyntaxUID="1.2.840.10008.1.2.1"))

    def _refused(self, event: events.AssociationRefused) -> None:
        key = event.peer.address or "unknown"
        now = time.monotonic()
        with self._alerts_lock:
            last, suppressed = self._alerts.get(key, (-ALERT_INTERVAL, 0))
            if now - last < ALERT_INTERVAL:
                self._alerts[key] = (last, suppressed + 1)
                return
            if len(self._alerts) > 10_000:
                self._alerts.clear()
            self._alerts[key] = (now, 0)
        description = f"association refused: {event.reason}"
        if suppressed:
            description += f" ({suppressed} more refused from this address in the {ALERT_INTERVAL:g} s before)"
        self.emit(catalog.security_alert(
            self.source, alert=NODE_AUTHENTICATION, reporter=self.node, subject=key, subject_is_node=True,
            performer=_dicom_participant(event.peer.ae_title, event.peer.address, requestor=True),
            description=description))

    def close(self) -> None:
        self.spool.close()
        self._sender.close()


_lock = threading.Lock()
_trail: AuditTrail | None = None


def trail() -> AuditTrail | None:
    """This process's audit trail, None while it is off."""
    return _trail


_forked_from: tuple[Settings, str] | None = None


def _after_fork_in_child() -> None:
    """A forked child (a prefork worker) has no sender thread: it starts a trail of its own when it
    first reports, in a spool slot of its own."""
    global _trail, _forked_from, _lock
    if _trail is not None:
        _forked_from = (_trail.settings, _trail.application)
        _trail = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _current() -> AuditTrail | None:
    global _forked_from
    if _trail is None and _forked_from is not None:
        (settings, application), _forked_from = _forked_from, None
        try:
            start(settings, application, report_activity=False)
        except OSError as exc:
            log.error("the audit trail could not start in this process: %s", exc)
    return _trail


def start(settings: Settings, application: str, *, report_activity: bool = True) -> AuditTrail | None:
    """Turn the trail on for this process (once; later calls return the same trail) and report
    Application Start; Application Stop is reported at exit. None when ``PNEUMOSCREEN_AUDIT_SYSLOG`` is empty."""
    global _trail
    if not settings.audit_syslog:
        return None
    with _lock:
        if _trail is not None:
            return _trail
        _trail = AuditTrail(settings, application)
    events.subscribe(_on_dicom_event)
    _hear_deliveries()
    if report_activity:
        _report(lambda: _trail.application_activity(started=True), _trail)
        atexit.register(stop)
    return _trail


def stop() -> None:
    """Report Application Stop, send what can be sent within 2 s (the rest stays for the next start)."""
    global _trail
    with _lock:
        current, _trail = _trail, None
    if current is None:
        return
    events.unsubscribe(_on_dicom_event)
    _report(lambda: current.application_activity(started=False), current)
    current.close()


_delivery_hook = None


def _hear_deliveries() -> None:
    """Every delivery that ends (SR, STOW-RS, HL7, FHIR) is audited: DICOM Instances Transferred or Export."""
    global _delivery_hook
    if _delivery_hook is not None:
        return
    from worker.delivery import on_outcome

    def delivered(kind: str, destination: str, study_uid: str, outcome: str, detail: str,
                  objects: Mapping[str, int]) -> None:
        export_event(kind, destination, study_uid, outcome, reason=None if outcome == "SENT" else detail,
                     sop_classes=objects)

    _delivery_hook = on_outcome(delivered)


def _on_dicom_event(event: events.Event) -> None:
    current = _current()
    _report(lambda: current.on_dicom_event(event), current)


def _report(action, current: AuditTrail | None) -> None:
    if current is None:
        return
    try:
        action()
    except (ValueError, OSError, RuntimeError) as exc:
        log.error("an audit message could not be built or kept: %s", exc)


def user_authentication(*, succeeded: bool, user: str, address: str | None, reason: str | None = None) -> None:
    """Web sign-in: ``user`` (a fingerprint or account name, never a secret) from ``address``."""
    current = _current()
    _report(lambda: current.emit(catalog.user_authentication(
        current.source, succeeded=succeeded, user=Participant(user, True, NetworkAccessPointID=address),
        node=current.node, description=reason)), current)


def refused_token(*, address: str | None, path: str, actor: str) -> None:
    """Security Alert: a request to ``path`` with a missing or wrong bearer token."""
    current = _current()
    _report(lambda: current.emit(catalog.security_alert(
        current.source, alert=USE_OF_RESTRICTED_FUNCTION, reporter=current.node, subject=f"http:{path}",
        performer=Participant(actor, True, NetworkAccessPointID=address),
        description=f"missing or wrong bearer token for {path}")), current)


_DICOM_KINDS = frozenset({"dicom", "dicom-sr", "stow", "dicomweb"})


def export_event(kind: str, destination: str, study_uid: str, outcome: bool | str, *,
                 reason: str | None = None, sop_classes: Mapping[str, int] | None = None,
                 patient_id: str | None = None) -> None:
    """A delivery ended: results of ``study_uid`` sent to ``destination`` (``AET@host:port`` or a URL).

    ``kind`` names the delivery ("dicom"/"dicom-sr"/"stow": DICOM Instances Transferred; "hl7",
    "fhir" or any other: Export); ``outcome`` is True/"SENT" for success, anything else a failure,
    with ``reason``. ``sop_classes`` (SOP Class UID -> count) says what was sent, when known.
    """
    current = _current()
    if current is None:
        return
    succeeded = outcome is True or (isinstance(outcome, str) and outcome.upper() == "SENT")
    result = Outcome.SUCCESS if succeeded else Outcome.SERIOUS_FAILURE
    ae_title, _, address = destination.rpartition("@") if "@" in destination and "//" not in destination \
        else (None, "", destination)
    receiver = _dicom_participant(ae_title, address.rsplit(":", 1)[0] if ae_title else None, requestor=False) \
        if ae_title else Participant(destination, False, NetworkAccessPointID=None)

    def build() -> bytes:
        if kind.lower() in _DICOM_KINDS:
            return catalog.instances_transferred(
                current.source, action="R", outcome=result, sender=current.node, receiver=receiver,
                StudyInstanceUID=study_uid, sop_classes=sop_classes or {}, PatientID=patient_id,
                description=reason)
        return catalog.export(current.source, outcome=result, exporter=current.node, destination=receiver,
                              StudyInstanceUID=study_uid, PatientID=patient_id,
                              description=f"{kind}: {reason}" if reason else kind)

    _report(lambda: current.emit(build()), current)
