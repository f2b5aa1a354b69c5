"""Results back to the PACS: when every image of a study has ended, its DICOM
Structured Report (and, optionally, Grad-CAM Secondary Captures) is sent by
C-STORE to ``PNEUMOSCREEN_RESULTS_DESTINATION``.

The database row (``result_delivery``) is the source of truth: a report is
requested in the same place the last prediction is recorded, claimed by one
sender, and ends SENT or FAILED with the reason. The report's SOP Instance UID
is derived from its content, so a retry sends the same object again (the PACS
keeps one copy) and a study that gained images gets a new report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import cv2
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
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
    stale_deliveries,
    unreported_studies,
)
from db.models import utcnow
from db.session import in_chunks
from dicom_io.scu import DeliveryError, Peer, send_datasets
from dicom_io.sr import AlgorithmInfo, build_heatmap_capture, build_screening_report
from worker.images import prepare_film

log = logging.getLogger(__name__)


def request_reports(sessions: sessionmaker[Session], *, instance_ids: list[int], model_version: str,
                    destination: str) -> list[int]:
    """Ask for the reports of the studies that ``instance_ids`` (just answered) left with no image
    in flight; returns the delivery ids to send."""
    with sessions.begin() as session:
        studies = {study_id for chunk in in_chunks(instance_ids)
                   for study_id in completed_studies(session, instance_ids=chunk)}
        return [request_delivery(session, study_id=study_id, model_version=model_version, destination=destination)
                for study_id in sorted(studies)]


def stale_reports(sessions: sessionmaker[Session], *, older_than_seconds: float) -> list[int]:
    with sessions.begin() as session:
        return stale_deliveries(session, older_than=utcnow() - timedelta(seconds=older_than_seconds))


#: how far back the reconciler looks for studies answered without a report being asked for
UNREPORTED_LOOKBACK = timedelta(hours=24)


def unreported_reports(sessions: sessionmaker[Session], *, destination: str, older_than_seconds: float) -> list[int]:
    """Ask for the reports that a worker killed between recording its answers and asking for them
    left unasked (studies answered in the last day, at least ``older_than_seconds`` ago); returns
    the delivery ids to send."""
    now = utcnow()
    with sessions.begin() as session:
        missing = unreported_studies(session, destination=destination, answered_since=now - UNREPORTED_LOOKBACK,
                                     answered_before=now - timedelta(seconds=older_than_seconds))
        ids = [request_delivery(session, study_id=study_id, model_version=version, destination=destination)
               for study_id, version in missing]
    if ids:
        log.warning("%d study report(s) were never asked for (a worker stopped after recording the answers); "
                    "asked for now", len(ids))
    return ids


def _algorithm(job: DeliveryJob) -> AlgorithmInfo:
    first = job.images[0]
    return AlgorithmInfo(name=first.model_name, version=job.model_version, weights_sha256=first.weights_sha256,
                         threshold=first.threshold)


def build_report(job: DeliveryJob) -> Dataset:
    """The study's SR from the spool files' headers, the recorded predictions and population notes."""
    sources = [dcmread(image.path, stop_before_pixels=True) for image in job.images]
    sop_uids = sorted(image.SOPInstanceUID for image in job.images)
    return build_screening_report(
        sources, [image.probability for image in job.images], [image.flagged for image in job.images],
        algorithm=_algorithm(job),
        sop_instance_uid=generate_uid(entropy_srcs=[job.StudyInstanceUID, job.model_version, *sop_uids]),
        series_instance_uid=generate_uid(entropy_srcs=[job.StudyInstanceUID, job.model_version, "SR"]),
        notes=[image.population_note for image in job.images],
    )


def build_heatmaps(job: DeliveryJob, keras_model, *, which: str) -> list[Dataset]:
    """Grad-CAM Secondary Captures for the flagged images (``which="flagged"``) or all of them."""
    from model.gradcam import gradcam, overlay

    captures = []
    series_uid = generate_uid(entropy_srcs=[job.StudyInstanceUID, job.model_version, "GRADCAM"])
    for number, image in enumerate(job.images, start=1):
        if which == "flagged" and not image.flagged:
            continue
        source = dcmread(image.path)
        film, prepared = prepare_film(source, keras_model.input_shape[1])
        rgb = cv2.cvtColor(overlay(film, gradcam(keras_model, prepared)), cv2.COLOR_BGR2RGB)
        captures.append(build_heatmap_capture(
            source, rgb, algorithm=_algorithm(job), probability=image.probability,
            sop_instance_uid=generate_uid(entropy_srcs=[image.SOPInstanceUID, job.model_version, "GRADCAM"]),
            series_instance_uid=series_uid, instance_number=number,
        ))
    return captures


def deliver(sessions: sessionmaker[Session], delivery_id: int, *, calling_ae: str, heatmaps: str = "none",
            keras_model: Callable[[], object] | None = None, timeout: float = 30.0,
            claim_seconds: float = 900.0) -> str:
    """Claim, build and send one study's report; returns what happened. A claim older than
    ``claim_seconds`` belongs to a sender that died, and is taken over.

    Raises ``DeliveryError`` when the destination did not take it (the caller
    retries and finally calls ``give_up``); the claim is released first.
    """
    with sessions.begin() as session:
        stale_before = utcnow() - timedelta(seconds=claim_seconds)
        if not claim_delivery(session, delivery_id=delivery_id, stale_before=stale_before):
            return "not claimed: already sent, being sent, or unknown"
        job = delivery_job(session, delivery_id=delivery_id)
    if job is None or not job.images:
        with sessions.begin() as session:
            release_delivery(session, delivery_id=delivery_id, reason="no screened image to report", final=True)
        return "nothing to report"
    try:
        report = build_report(job)
        datasets = [report]
        if heatmaps != "none" and keras_model is not None:
            datasets += build_heatmaps(job, keras_model(), which=heatmaps)
    except (OSError, ValueError) as exc:
        reason = f"report could not be built: {type(exc).__name__}: {exc}"
        with sessions.begin() as session:
            release_delivery(session, delivery_id=delivery_id, reason=reason, final=True)
        log.error("delivery %d (study %s): %s", delivery_id, job.StudyInstanceUID, reason)
        return reason
    peer = Peer.parse(job.destination)
    try:
        send_datasets(peer, datasets, calling_ae=calling_ae, timeout=timeout)
    except DeliveryError as exc:
        with sessions.begin() as session:
            release_delivery(session, delivery_id=delivery_id, reason=str(exc), final=False)
        raise
    with sessions.begin() as session:
        finish_delivery(session, delivery_id=delivery_id, sr_sop_instance_uid=report.SOPInstanceUID,
                        instance_count=len(job.images))
    log.info("study %s: report %s (%d image(s), %d heatmap(s)) sent to %s", job.StudyInstanceUID,
             report.SOPInstanceUID, len(job.images), len(datasets) - 1, peer.ae_title)
    return "sent"


def give_up(sessions: sessionmaker[Session], delivery_id: int, reason: str) -> None:
    """The retries are spent: the delivery is FAILED with ``reason`` (visible, and re-sent on request)."""
    with sessions.begin() as session:
        fail_delivery(session, delivery_id=delivery_id, reason=reason)
    log.error("delivery %d FAILED: %s", delivery_id, reason)
