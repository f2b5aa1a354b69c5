"""Claim, build, send, record: the one delivery path, the same for every kind of destination.

The database row (``result_delivery``) is the source of truth: a delivery is requested in the same
place the last prediction of a study is recorded, claimed by one sender, and ends SENT (with the
destination's receipt) or FAILED (with the reason). A claim older than ``claim_seconds`` belongs to a
sender that died, and is taken over; the reconciler re-sends what a lost message or a kill left
behind, and asks for what a worker killed between answering and asking never asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db.deliveries import (
    DeliveryJob,
    claim_delivery,
    completed_studies,
    delivery_job,
    fail_delivery,
    finish_delivery,
    release_delivery,
    request_delivery,
    stale_deliveries as stale_delivery_ids,
    unreported_studies,
)
from db.models import utcnow
from db.session import in_chunks
from worker.delivery.base import Destination, SendError

log = logging.getLogger(__name__)

#: how far back the reconciler looks for studies answered without a delivery being asked for
UNREPORTED_LOOKBACK = timedelta(hours=24)

#: finds the destination of a delivery row from its kind and address
Resolver = Callable[[str, str], Destination]

#: called with (kind, address, study UID, outcome "SENT"/"FAILED", receipt or reason, the DICOM objects sent
#: as {SOP Class UID: count}, empty for other kinds or a failure) once a delivery has ended
Outcome = Callable[[str, str, str, str, str, Mapping[str, int]], None]

_outcome_hooks: list[Outcome] = []


def on_outcome(hook: Outcome) -> Outcome:
    """Register ``hook`` to hear of every delivery that ended (the audit trail's Export events)."""
    _outcome_hooks.append(hook)
    return hook


def _ended(job: DeliveryJob, outcome: str, detail: str, objects: Mapping[str, int] | None = None) -> None:
    report_outcome(job.kind, job.destination, job.StudyInstanceUID, outcome, detail, objects)


def report_outcome(kind: str, address: str, study_uid: str, outcome: str, detail: str,
                   objects: Mapping[str, int] | None = None) -> None:
    """Tell every registered hook that a delivery ended (``outcome`` "SENT" or "FAILED"; ``detail`` the
    receipt or the reason; ``objects`` the DICOM objects sent by SOP Class UID)."""
    for hook in _outcome_hooks:
        try:
            hook(kind, address, study_uid, outcome, detail, dict(objects or {}))
        except Exception:  # noqa: BLE001 - a hook's failure must not undo a delivery already recorded
            log.exception("delivery outcome hook %r failed", hook)


def request_deliveries(sessions: sessionmaker[Session], *, instance_ids: list[int], model_version: str,
                       destinations: Sequence[Destination]) -> list[int]:
    """Ask, for every destination, for the results of the studies that ``instance_ids`` (just answered)
    left with no image in flight; returns the delivery ids to send."""
    if not destinations or not instance_ids:
        return []
    with sessions.begin() as session:
        studies = {study_id for chunk in in_chunks(instance_ids)
                   for study_id in completed_studies(session, instance_ids=chunk)}
        return [request_delivery(session, study_id=study_id, model_version=model_version, kind=d.kind,
                                 destination=d.address)
                for d in destinations for study_id in sorted(studies)]


def stale_deliveries(sessions: sessionmaker[Session], *, older_than_seconds: float) -> list[int]:
    """Deliveries PENDING or SENDING for longer than ``older_than_seconds`` (a lost message, a dead sender)."""
    with sessions.begin() as session:
        return stale_delivery_ids(session, older_than=utcnow() - timedelta(seconds=older_than_seconds))


def unrequested_deliveries(sessions: sessionmaker[Session], *, destinations: Sequence[Destination],
                           older_than_seconds: float) -> list[int]:
    """Ask for the deliveries that a worker killed between recording its answers and asking for them left
    unasked (studies answered in the last day, at least ``older_than_seconds`` ago), for every
    destination; returns the delivery ids to send."""
    now = utcnow()
    ids = []
    with sessions.begin() as session:
        for d in destinations:
            missing = unreported_studies(session, kind=d.kind, destination=d.address,
                                         answered_since=now - UNREPORTED_LOOKBACK,
                                         answered_before=now - timedelta(seconds=older_than_seconds))
            ids += [request_delivery(session, study_id=study_id, model_version=version, kind=d.kind,
                                     destination=d.address) for study_id, version in missing]
    if ids:
        log.warning("%d deliveries were never asked for (a worker stopped after recording the answers); "
                    "asked for now", len(ids))
    return ids


def _release(sessions: sessionmaker[Session], delivery_id: int, reason: str, *, final: bool) -> None:
    with sessions.begin() as session:
        release_delivery(session, delivery_id=delivery_id, reason=reason, final=final)


def deliver(sessions: sessionmaker[Session], delivery_id: int, resolve: Resolver, *,
            claim_seconds: float = 900.0) -> str:
    """Claim, build and send one delivery; returns what happened.

    Raises :class:`SendError` when the destination did not take it (the caller retries and finally
    calls :func:`give_up`); the claim is released first.
    """
    with sessions.begin() as session:
        if not claim_delivery(session, delivery_id=delivery_id,
                              stale_before=utcnow() - timedelta(seconds=claim_seconds)):
            return "not claimed: already sent, being sent, or unknown"
        job = delivery_job(session, delivery_id=delivery_id)
    if job is None or not job.images:
        _release(sessions, delivery_id, "no screened image to report", final=True)
        return "nothing to report"
    try:
        destination = resolve(job.kind, job.destination)
        content = destination.build(job)
    except (OSError, ValueError) as exc:
        reason = f"could not be built: {type(exc).__name__}: {exc}"
        _release(sessions, delivery_id, reason, final=True)
        log.error("delivery %d (%s, study %s): %s", delivery_id, job.kind, job.StudyInstanceUID, reason)
        _ended(job, "FAILED", reason)
        return reason
    try:
        receipt = destination.send(content)
    except SendError as exc:
        _release(sessions, delivery_id, str(exc), final=False)
        raise
    with sessions.begin() as session:
        finish_delivery(session, delivery_id=delivery_id, receipt=receipt.value, instance_count=len(job.images))
    log.info("study %s: %s sent to %s (%d image(s)) %s", job.StudyInstanceUID, job.kind, destination.address,
             len(job.images), receipt.summary)
    _ended(job, "SENT", receipt.value, receipt.objects)
    return "sent"


def give_up(sessions: sessionmaker[Session], delivery_id: int, reason: str) -> None:
    """The retries are spent: the delivery is FAILED with ``reason`` (visible, and re-sent on request)."""
    with sessions.begin() as session:
        fail_delivery(session, delivery_id=delivery_id, reason=reason)
        job = delivery_job(session, delivery_id=delivery_id)
    log.error("delivery %d FAILED: %s", delivery_id, reason)
    if job is not None:
        _ended(job, "FAILED", reason)


def deliver_here(sessions: sessionmaker[Session], *, instance_ids: list[int], model_version: str,
                 destinations: Sequence[Destination], resolve: Resolver, claim_seconds: float) -> None:
    """Request and send at once, in this process (a command that screened studies itself); a delivery the
    destination does not take stays PENDING for the service's reconciler."""
    for delivery_id in request_deliveries(sessions, instance_ids=instance_ids, model_version=model_version,
                                          destinations=destinations):
        try:
            deliver(sessions, delivery_id, resolve, claim_seconds=claim_seconds)
        except SendError as exc:
            log.warning("delivery %d not taken (%s); the service re-sends it", delivery_id, exc)
