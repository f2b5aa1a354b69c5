"""The screening result of a study as FHIR R4 resources, in one transaction Bundle.

Built with ``fhir.resources``' validated models (its ``R4B`` package: DiagnosticReport, Observation, Device
and Bundle are the same in R4 and R4B, and the JSON is R4's), never as dicts:

- a **Device**: the model (name, version, weights SHA-256), identified by the same Device UID as the
  algorithm in our DICOM SR, created once (conditional create, ``ifNoneExist``);
- an **Observation** per screened image: the probability of pneumonia (``valueQuantity``, UCUM ``1``) with
  the decision threshold as a component, interpretation H/N, the image named by its SOP Instance UID;
- an **Observation** for the study: pneumonia present/absent (``valueCodeableConcept``, SNOMED CT), flagged
  when any image is, derived from the image Observations;
- a **DiagnosticReport**: status ``preliminary`` (``amended`` or ``corrected`` when it replaces the result of
  another model version), category Radiology, code LOINC 18748-4 "Diagnostic imaging study", the patient by
  the films' PatientID, the study by its Study Instance UID (``imagingStudy``), the order by its accession
  number (``basedOn``), the Observations as ``result``.

Identity: every resource is written by a conditional update or create on an identifier derived from the
study (and the image), so a retried transaction finds what the first one made and changes it in place, and
a new model version's report replaces the earlier one (the server keeps the earlier one in its history).
The report also carries an identifier derived from the study and the model version.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from pydicom import dcmread
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from db.deliveries import DeliveryJob, EarlierDelivery, ScreenedImage
from dicom_io.sr import (
    ABSENT,
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    AlgorithmInfo,
)
from model.artifact import study_flagged

DICOM_UID = "urn:dicom:uid"
LOINC = "http://loinc.org"
SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "UCUM": "http://unitsofmeasure.org", "LN": LOINC}
"""FHIR code system URIs of the DICOM coding scheme designators we use."""
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

RADIOLOGY = CodeableConcept(coding=[Coding(system=LOINC, code="LP29684-5", display="Radiology"),
                                    Coding(system=V2_0074, code="RAD", display="Radiology")])
IMAGING_REPORT = CodeableConcept(coding=[Coding(system=LOINC, code="18748-4", display="Diagnostic imaging study")],
                                 text="Chest X-ray pneumonia screening (AI), preliminary")


@dataclass(frozen=True)
class Identifiers:
    """The site's identifier systems (URIs) of the patient IDs in the films and of the accession numbers
    (the RIS's orders); empty: the identifier is sent without a system."""

    patient_system: str = ""
    accession_system: str = ""


def coding(code: Code) -> Coding:
    """A DICOM-style code (pydicom) as a FHIR Coding."""
    return Coding(system=SYSTEMS[code.scheme_designator], code=code.value, display=code.meaning)


def uid_identifier(*entropy: str, use: str | None = None) -> Identifier:
    """An identifier in the ``urn:dicom:uid`` system, derived from ``entropy`` (the same input, the same UID)."""
    return Identifier(use=use, system=DICOM_UID, value=f"urn:oid:{generate_uid(entropy_srcs=list(entropy))}")


def _study_reference(job: DeliveryJob, display: str | None = None) -> Reference:
    return Reference(type="ImagingStudy", display=display,
                     identifier=Identifier(system=DICOM_UID, value=f"urn:oid:{job.StudyInstanceUID}"))


def _full_url(identifier: Identifier) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{identifier.system}|{identifier.value}").urn


def _entry(resource: Resource, key: Identifier, *, create_once: bool = False) -> BundleEntry:
    """``resource`` written by a conditional update on ``key`` (or created once, ``create_once``)."""
    query = urlencode({"identifier": f"{key.system}|{key.value}"})
    kind = resource.get_resource_type()
    request = (BundleEntryRequest(method="POST", url=kind, ifNoneExist=query) if create_once
               else BundleEntryRequest(method="PUT", url=f"{kind}?{query}"))
    return BundleEntry(fullUrl=_full_url(key), resource=resource, request=request)


def algorithm(job: DeliveryJob) -> AlgorithmInfo:
    first = job.images[0]
    return AlgorithmInfo(name=first.model_name, version=job.model_version, weights_sha256=first.weights_sha256,
                         threshold=first.threshold)


def device(model: AlgorithmInfo) -> tuple[Device, Identifier]:
    key = Identifier(system=DICOM_UID, value=f"urn:oid:{model.device_uid()}")
    return Device(
        identifier=[key], status="active", manufacturer=MANUFACTURER,
        deviceName=[DeviceDeviceName(name=model.name, type="model-name")],
        type=CodeableConcept(text="AI screening algorithm (pneumonia on chest X-ray)"),
        version=[DeviceVersion(type=CodeableConcept(text="model version"), value=model.version),
                 DeviceVersion(type=CodeableConcept(text="weights sha256"), value=model.weights_sha256)],
    ), key


def _status(earlier: Sequence[EarlierDelivery], flagged: bool) -> str:
    """preliminary; amended when it replaces another model version's result, corrected when it changes it."""
    if not earlier:
        return "preliminary"
    return "corrected" if earlier[-1].flagged != flagged else "amended"


def image_observation(job: DeliveryJob, image: ScreenedImage, *, subject: Reference | None, device_url: str,
                      status: str) -> tuple[Observation, Identifier]:
    key = uid_identifier(job.StudyInstanceUID, image.SOPInstanceUID, "FHIR probability")
    observation = Observation(
        identifier=[key], status=status, code=CodeableConcept(coding=[coding(PROBABILITY)],
                                                              text="Probability of pneumonia"),
        category=[CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging", display="Imaging")])],
        subject=subject, device=Reference(reference=device_url),
        valueQuantity=Quantity(value=round(float(image.probability), 6), unit="1", system=SYSTEMS["UCUM"], code="1"),
        interpretation=[CodeableConcept(coding=[Coding(system=INTERPRETATION, code="H" if image.flagged else "N",
                                                       display="High" if image.flagged else "Normal")])],
        component=[ObservationComponent(
            code=CodeableConcept(coding=[coding(THRESHOLD)]),
            valueQuantity=Quantity(value=round(float(image.threshold), 6), unit="1", system=SYSTEMS["UCUM"],
                                   code="1"))],
        derivedFrom=[_study_reference(job, f"SOP Instance UID {image.SOPInstanceUID}")],
        note=[Annotation(text=image.population_note)] if image.population_note else None,
    )
    return observation, key


def study_observation(job: DeliveryJob, *, flagged: bool, subject: Reference | None, device_url: str,
                      members: list[str], status: str) -> tuple[Observation, Identifier]:
    key = uid_identifier(job.StudyInstanceUID, "FHIR study flag")
    observation = Observation(
        identifier=[key], status=status, code=CodeableConcept(coding=[coding(PNEUMONIA)], text="Pneumonia (AI flag)"),
        category=[CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging", display="Imaging")])],
        subject=subject, device=Reference(reference=device_url),
        valueCodeableConcept=CodeableConcept(coding=[coding(PRESENT if flagged else ABSENT)]),
        derivedFrom=[_study_reference(job), *(Reference(reference=url) for url in members)],
    )
    return observation, key


def _conclusion(job: DeliveryJob, model: AlgorithmInfo, flagged: bool) -> str:
    top = max(image.probability for image in job.images)
    text = (f"AI screening: pneumonia {'FLAGGED' if flagged else 'not flagged'} (highest probability {top:.3f}, "
            f"threshold {model.threshold:.3f}, {len(job.images)} image(s), model {model.name} {model.version}). "
            f"{NOT_FOR_DIAGNOSIS}.")
    if job.earlier:
        before = job.earlier[-1]
        text += (f" Replaces the result of model version {before.model_version} "
                 f"({'flagged' if before.flagged else 'not flagged'}).")
    return text


@dataclass(frozen=True)
class _Header:
    PatientID: str
    StudyDate: str


def _header(image: ScreenedImage) -> _Header:
    """The film's PatientID and StudyDate (raises OSError when the spool file cannot be read)."""
    ds = dcmread(image.path, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate"])
    return _Header(str(ds.get("PatientID", "") or "").strip(), str(ds.get("StudyDate", "") or "").strip())


def _subject(patient_id: str, identifiers: Identifiers) -> Reference | None:
    if not patient_id:
        return None
    return Reference(type="Patient", identifier=Identifier(system=identifiers.patient_system or None,
                                                           value=patient_id))


def _based_on(job: DeliveryJob, identifiers: Identifiers) -> list[Reference] | None:
    if not job.AccessionNumber:
        return None
    return [Reference(type="ServiceRequest", identifier=Identifier(
        type=CodeableConcept(coding=[Coding(system=V2_0203, code="ACSN", display="Accession ID")]),
        system=identifiers.accession_system or None, value=job.AccessionNumber))]


def _effective(study_date: str) -> str | None:
    return f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:8]}" if len(study_date) == 8 and study_date.isdigit() \
        else None


def report_bundle(job: DeliveryJob, identifiers: Identifiers = Identifiers()) -> Bundle:
    """The transaction Bundle of ``job``'s result: Device, Observations, DiagnosticReport (validated models).

    Deterministic: the same job gives the same Bundle, resource identities included. Raises ``ValueError``
    for a job with no image, ``OSError`` when a film's header cannot be read.
    """
    if not job.images:
        raise ValueError(f"study {job.StudyInstanceUID}: no screened image to report")
    model = algorithm(job)
    header = _header(job.images[0])
    subject = _subject(header.PatientID, identifiers)
    flagged = study_flagged(image.flagged for image in job.images)
    status = _status(job.earlier, flagged)
    model_device, device_key = device(model)
    entries = [_entry(model_device, device_key, create_once=True)]
    for image in job.images:
        observation, key = image_observation(job, image, subject=subject, device_url=_full_url(device_key),
                                             status=status)
        entries.append(_entry(observation, key))
    summary, summary_key = study_observation(job, flagged=flagged, subject=subject, device_url=_full_url(device_key),
                                             members=[e.fullUrl for e in entries[1:]], status=status)
    entries.append(_entry(summary, summary_key))
    key = uid_identifier(job.StudyInstanceUID, "FHIR DiagnosticReport", use="official")
    report = DiagnosticReport(
        identifier=[key, uid_identifier(job.StudyInstanceUID, job.model_version, "FHIR DiagnosticReport",
                                        use="secondary")],
        basedOn=_based_on(job, identifiers), status=status, category=[RADIOLOGY], code=IMAGING_REPORT,
        subject=subject, effectiveDateTime=_effective(header.StudyDate), imagingStudy=[_study_reference(job)],
        result=[Reference(reference=e.fullUrl) for e in entries[1:]],
        conclusion=_conclusion(job, model, flagged),
        conclusionCode=[CodeableConcept(coding=[coding(PNEUMONIA)])] if flagged else None,
    )
    entries.append(_entry(report, key))
    sop_uids = sorted(image.SOPInstanceUID for image in job.images)
    return Bundle(type="transaction", entry=entries,
                  identifier=uid_identifier(job.StudyInstanceUID, job.model_version, *sop_uids, "FHIR Bundle"))
