"""The FHIR destination: the study's result as a transaction Bundle (DiagnosticReport, Observations,
Device; :mod:`worker.fhir.report`) POSTed to ``PNEUMOSCREEN_FHIR_BASE_URL``.

Every resource in the Bundle is written by a conditional update (or create) on an identifier derived from
the study, so a transaction sent again after a lost answer or a kill changes what the first one made instead
of making a second report. A 2xx answer is sent (the receipt is the DiagnosticReport's location); any other
answer, or none within ``PNEUMOSCREEN_RESULTS_TIMEOUT_SECONDS``, is a :class:`SendError` with the server's
own words (its OperationOutcome). The bearer token is sent, never logged and never stored on the row.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydantic import SecretStr, ValidationError

from db.deliveries import DeliveryJob
from worker.delivery.base import Destination, Receipt, SendError
from worker.fhir.report import Identifiers, report_bundle

FHIR_JSON = "application/fhir+json"
#: answers worth trying again as they are: the server is busy, overloaded or timed out
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def outcome_text(response: httpx.Response) -> str:
    """The server's own words: its OperationOutcome's issues, else the start of the body."""
    try:
        outcome = OperationOutcome.model_validate(response.json())
    except (ValueError, ValidationError):
        return response.text.strip()[:500] or response.reason_phrase
    issues = [f"{issue.severity} {issue.code}: "
              f"{issue.diagnostics or (issue.details.text if issue.details else None) or '(no text)'}"
              for issue in outcome.issue]
    return "; ".join(issues)


def report_location(response: httpx.Response, request: Bundle) -> str:
    """The location of the DiagnosticReport in a transaction-response (the entry at the report's place)."""
    try:
        answer = Bundle.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise SendError(f"HTTP {response.status_code} but not a FHIR Bundle: {exc}", transient=False) from exc
    kinds = [entry.resource.get_resource_type() for entry in request.entry]
    entries = answer.entry or []
    if answer.type != "transaction-response" or len(entries) != len(kinds):
        raise SendError(f"HTTP {response.status_code} but a {answer.type} of {len(entries)} entries, not a "
                        f"transaction-response of {len(kinds)}", transient=False)
    report = entries[kinds.index("DiagnosticReport")].response
    if report is None or not report.status.startswith("2") or not report.location:
        raise SendError(f"the server answered {report.status if report else 'nothing'} for the DiagnosticReport, "
                        "without its location", transient=False)
    return report.location


class FhirDestination(Destination):
    """A FHIR R4 server that takes our report as a transaction at its base URL."""

    kind = "fhir"

    def __init__(self, base_url: str, *, token: SecretStr | None = None, timeout: float = 30.0,
                 ca_bundle: Path | None = None, identifiers: Identifiers = Identifiers()) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"FHIR base URL {base_url!r} must be an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.verify: str | bool = str(ca_bundle) if ca_bundle else True
        self.identifiers = identifiers

    @property
    def address(self) -> str:
        return self.base_url

    def build(self, job: DeliveryJob) -> Bundle:
        return report_bundle(job, self.identifiers)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        return headers

    def send(self, content: Bundle) -> Receipt:
        body = content.model_dump_json(exclude_none=True)
        try:
            with httpx.Client(timeout=self.timeout, verify=self.verify) as client:
                response = client.post(self.base_url, content=body, headers=self._headers())
        except httpx.HTTPError as exc:
            raise SendError(f"no answer from the FHIR server {self.base_url}: {type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            raise SendError(f"HTTP {response.status_code} from {self.base_url}: {outcome_text(response)}",
                            transient=response.status_code in TRANSIENT_STATUS)
        location = report_location(response, content)
        observations = sum(entry.resource.get_resource_type() == "Observation" for entry in content.entry)
        return Receipt(location, f"{location} with {observations} observation(s), transaction "
                                 f"{content.identifier.value}")
