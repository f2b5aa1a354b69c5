"""The DICOMweb destination: the study's Structured Report (and the optional Grad-CAM Secondary Captures,
the same objects as :mod:`worker.delivery.dicom` sends by C-STORE) stored by STOW-RS (PS3.18 10.5) at
``PNEUMOSCREEN_RESULTS_DICOMWEB_URL``, for archives that take DICOMweb only.

The objects' UIDs are derived from their content, so a retry stores the same SR again (the archive keeps
one copy). The archive's answer is read as PS3.18 Annex I says: an instance in its Failed SOP Sequence was
not stored, and its Failure Reason is the reason the delivery is retried and finally FAILED with.
"""

from __future__ import annotations

import logging

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from db.deliveries import DeliveryJob
from worker.delivery.base import Destination, Receipt, SendError
from worker.delivery.dicom import ResultObjects, sop_class_counts

log = logging.getLogger(__name__)

#: Failure Reason (0008,1197) values of PS3.18 Table I.2-2 (and the DIMSE statuses they reuse), by meaning
FAILURE_REASONS = {
    0xA700: "refused: out of resources", 0xA900: "data set does not match SOP class", 0xC000: "cannot understand",
    0xC122: "transfer syntax not supported", 0x0110: "processing failure", 0x0122: "SOP class not supported",
}
#: HTTP statuses after which the same request may well be taken later
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def describe_failure(reason: int) -> str:
    """``0xA700 (refused: out of resources)``: a Failure Reason and its meaning (by its range where not listed)."""
    meaning = FAILURE_REASONS.get(reason) or FAILURE_REASONS.get(reason & 0xFF00) or (
        "cannot understand" if 0xC000 <= reason <= 0xCFFF else "failure")
    return f"0x{reason:04X} ({meaning})"


def failed_instances(answer: Dataset) -> list[tuple[str, int]]:
    """(ReferencedSOPInstanceUID, FailureReason) of every item of a Store Instances Response's Failed SOP Sequence."""
    return [(str(item.get("ReferencedSOPInstanceUID", "") or "?"), int(item.get("FailureReason", 0x0110) or 0x0110))
            for item in answer.get("FailedSOPSequence", [])]


def _answer_of(response: requests.Response | None) -> Dataset:
    """The DICOM JSON body of a STOW-RS answer, or an empty data set when it has none (or none we can read)."""
    if response is None or not response.content:
        return Dataset()
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in ("application/dicom+json",
                                                                               "application/json"):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("the STOW-RS answer is not DICOM JSON: %s", exc)
        return Dataset()


def _refused(status: int | None, answer: Dataset, text: str) -> SendError:
    failed = failed_instances(answer)
    if failed:
        detail = "; ".join(f"{uid}: {describe_failure(reason)}" for uid, reason in failed)
        transient = all(0xA700 <= reason <= 0xA7FF for _, reason in failed) or status in TRANSIENT_HTTP
    else:
        detail = " ".join(text.split())[:300] or "no reason given"
        transient = status is None or status in TRANSIENT_HTTP
    where = "no answer" if status is None else f"HTTP {status}"
    return SendError(f"STOW-RS {where}: {detail}", transient=transient)


class DicomwebDestination(Destination):
    """An archive that takes our SR by STOW-RS: ``url`` is its DICOMweb base (``.../dicom-web``), the
    request goes to ``{url}/studies``."""

    kind = "dicomweb"

    def __init__(self, url: str, *, token: str | None = None, objects: ResultObjects | None = None,
                 timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.objects = objects or ResultObjects()
        self.timeout = timeout
        self._headers = {"Accept": "application/dicom+json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    @property
    def address(self) -> str:
        return self.url

    def build(self, job: DeliveryJob) -> list[Dataset]:
        return self.objects.build(job)

    def _client(self) -> DICOMwebClient:
        client = DICOMwebClient(self.url, headers=dict(self._headers), timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # the delivery engine retries, with backoff, and records it
        return client

    def send(self, content: list[Dataset]) -> Receipt:
        report = content[0]
        try:
            answer = self._client().store_instances(content)
        except requests.HTTPError as exc:
            response = exc.response
            raise _refused(response.status_code if response is not None else None, _answer_of(response),
                           response.text if response is not None else str(exc)) from exc
        except (requests.RequestException, OSError) as exc:
            raise SendError(f"STOW-RS to {self.url}: no answer: {type(exc).__name__}: {exc}") from exc
        if failed_instances(answer):  # 202: some stored, some not; the report is resent whole
            raise _refused(202, answer, "")
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])}
        if "ReferencedSOPSequence" in answer and report.SOPInstanceUID not in stored:
            raise SendError(f"STOW-RS: the archive's answer does not list the report {report.SOPInstanceUID} "
                            "as stored", transient=False)
        return Receipt(report.SOPInstanceUID, f"report {report.SOPInstanceUID}, {len(content) - 1} heatmap(s), "
                                              f"by STOW-RS", objects=sop_class_counts(content))
