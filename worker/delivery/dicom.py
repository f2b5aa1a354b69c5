"""The DICOM destination: the study's Structured Report (and, optionally, Grad-CAM Secondary Captures)
sent by C-STORE to ``PNEUMOSCREEN_RESULTS_DESTINATION``.

The report's SOP Instance UID is derived from its content, so a retry sends the same object again (the
PACS keeps one copy) and a study that gained images gets a new report. The same objects go out by STOW-RS
through :mod:`worker.delivery.dicomweb` where the archive takes DICOMweb only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from db.deliveries import DeliveryJob
from dicom_io.scu import DeliveryError, Peer, send_datasets
from dicom_io.sr import AlgorithmInfo, build_heatmap_capture, build_screening_report
from worker.delivery.base import Destination, Receipt, SendError
from worker.heatmaps import heatmap_overlay

log = logging.getLogger(__name__)


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


def build_heatmaps(job: DeliveryJob, model, *, which: str) -> list[Dataset]:
    """Grad-CAM Secondary Captures for the flagged images (``which="flagged"``) or all of them, drawn by the
    one heatmap function (under the model's lock: deliveries run beside inference in a worker)."""
    captures = []
    series_uid = generate_uid(entropy_srcs=[job.StudyInstanceUID, job.model_version, "GRADCAM"])
    for number, image in enumerate(job.images, start=1):
        if which == "flagged" and not image.flagged:
            continue
        source = dcmread(image.path)
        rgb = cv2.cvtColor(heatmap_overlay(source, model), cv2.COLOR_BGR2RGB)
        captures.append(build_heatmap_capture(
            source, rgb, algorithm=_algorithm(job), probability=image.probability,
            sop_instance_uid=generate_uid(entropy_srcs=[image.SOPInstanceUID, job.model_version, "GRADCAM"]),
            series_instance_uid=series_uid, instance_number=number,
        ))
    return captures


def sop_class_counts(datasets: list[Dataset]) -> dict[str, int]:
    """{SOP Class UID: how many} of ``datasets`` (what an audit message says was sent)."""
    return dict(Counter(str(ds.SOPClassUID) for ds in datasets))


@dataclass
class ResultObjects:
    """Shared by the DICOM destinations (C-STORE and STOW-RS): the report and its optional heatmaps."""

    heatmaps: str = "none"
    #: the served model (a ``model.artifact.LoadedModel``), loaded only when a heatmap is asked for
    model: Callable[[], object] | None = field(default=None, repr=False)

    def build(self, job: DeliveryJob) -> list[Dataset]:
        """The SR first, then the heatmaps asked for; the SR's SOP Instance UID is the receipt."""
        datasets = [build_report(job)]
        if self.heatmaps != "none" and self.model is not None:
            datasets += build_heatmaps(job, self.model(), which=self.heatmaps)
        return datasets


class DicomDestination(Destination):
    """A PACS that takes our SR by C-STORE (``AET@host:port``)."""

    kind = "dicom"

    def __init__(self, peer: Peer | str, *, calling_ae: str, objects: ResultObjects | None = None,
                 timeout: float = 30.0) -> None:
        self.peer = Peer.parse(peer) if isinstance(peer, str) else peer
        self.calling_ae = calling_ae
        self.objects = objects or ResultObjects()
        self.timeout = timeout

    @property
    def address(self) -> str:
        return str(self.peer)

    def build(self, job: DeliveryJob) -> list[Dataset]:
        return self.objects.build(job)

    def send(self, content: list[Dataset]) -> Receipt:
        try:
            send_datasets(self.peer, content, calling_ae=self.calling_ae, timeout=self.timeout)
        except DeliveryError as exc:
            raise SendError(str(exc), transient=exc.transient) from exc
        report = content[0]
        return Receipt(report.SOPInstanceUID, f"report {report.SOPInstanceUID}, {len(content) - 1} heatmap(s), "
                                              f"to {self.peer.ae_title}", objects=sop_class_counts(content))
