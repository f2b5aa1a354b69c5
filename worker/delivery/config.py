"""The destinations of results, built in one place from the settings.

Each kind has one factory ``(address, settings, resources) -> Destination``. The configured destinations
(what new results are sent to) come from their settings; a delivery row names its kind and address, so a
row requested before a setting changed still goes where it was asked to go, with today's credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from worker.delivery.base import Destination
from worker.delivery.dicom import DicomDestination, ResultObjects
from worker.delivery.dicomweb import DicomwebDestination
from worker.delivery.fhir import FhirDestination
from worker.delivery.hl7 import Hl7Destination
from worker.fhir.report import Identifiers
from worker.hl7.oru import Parties
from worker.settings import Settings


@dataclass(frozen=True)
class Resources:
    """What a destination may need beyond its settings: the served model, for heatmaps."""

    #: the served model (``model.artifact.LoadedModel``), loaded on first use
    model: Callable[[], object] | None = field(default=None, repr=False)


Factory = Callable[[str, Settings, Resources], Destination]


def result_objects(settings: Settings, resources: Resources) -> ResultObjects:
    return ResultObjects(heatmaps=settings.results_heatmaps, model=resources.model)


def _dicom(address: str, settings: Settings, resources: Resources) -> Destination:
    return DicomDestination(address, calling_ae=settings.ae_title, objects=result_objects(settings, resources),
                            timeout=settings.results_timeout_seconds)


def _dicomweb(address: str, settings: Settings, resources: Resources) -> Destination:
    token = settings.results_dicomweb_token
    return DicomwebDestination(address, token=token.get_secret_value() if token else None,
                               objects=result_objects(settings, resources), timeout=settings.results_timeout_seconds)


def _fhir(address: str, settings: Settings, resources: Resources) -> Destination:
    return FhirDestination(str(address), token=settings.fhir_token, timeout=settings.results_timeout_seconds,
                           ca_bundle=settings.fhir_ca_bundle,
                           identifiers=Identifiers(patient_system=settings.fhir_patient_identifier_system,
                                                   accession_system=settings.fhir_accession_identifier_system))


def _hl7(address: str, settings: Settings, resources: Resources) -> Destination:
    return Hl7Destination(address, timeout=settings.results_timeout_seconds, parties=Parties(
        sending_application=settings.hl7_sending_application, sending_facility=settings.hl7_sending_facility,
        receiving_application=settings.hl7_receiving_application,
        receiving_facility=settings.hl7_receiving_facility, processing_id=settings.hl7_processing_id,
        universal_service=settings.hl7_universal_service, patient_id_authority=settings.hl7_patient_id_authority))


#: kind -> (the setting that configures it, the factory); a new kind of destination registers here
KINDS: dict[str, tuple[str, Factory]] = {
    "dicom": ("results_destination", _dicom),
    "fhir": ("fhir_base_url", _fhir),
    "dicomweb": ("results_dicomweb_url", _dicomweb),
    "hl7": ("hl7_destination", _hl7),
}


def destination_for(kind: str, address: str, settings: Settings, resources: Resources = Resources()) -> Destination:
    """The destination a delivery row names. Raises ``ValueError`` for a kind this version does not know."""
    try:
        _, factory = KINDS[kind]
    except KeyError:
        raise ValueError(f"no destination of kind {kind!r} (known: {', '.join(sorted(KINDS))})") from None
    return factory(address, settings, resources)


def configured_destinations(settings: Settings, resources: Resources = Resources()) -> list[Destination]:
    """Every destination the settings turn on, in the order of :data:`KINDS`."""
    return [factory(address, settings, resources) for setting, factory in KINDS.values()
            if (address := getattr(settings, setting))]


def configured_kinds(settings: Settings) -> list[str]:
    """The kinds of destination the settings turn on (without building them)."""
    return [kind for kind, (setting, _) in KINDS.items() if getattr(settings, setting)]


def resolver(settings: Settings, resources: Resources = Resources()) -> Callable[[str, str], Destination]:
    """``(kind, address) -> Destination`` for :func:`worker.delivery.engine.deliver`."""
    return lambda kind, address: destination_for(kind, address, settings, resources)
