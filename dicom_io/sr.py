"""The screening result as DICOM objects for the PACS, built with highdicom.

- A TID 1500 Measurement Report in a Comprehensive 3D SR document: the
  algorithm as device observer, the procedure reported (plain chest X-ray),
  one measurement group per screened image (finding Pneumonia, the probability
  and the decision threshold as NUM items identifying the algorithm, Pneumonia
  present/absent as the flag, the image as source) and one study summary group
  (the maximum probability over the images, flagged if any image is). An image
  whose patient is outside, or not known to be within, the model's intended
  population carries that note as a TEXT Comment in its group.
- The Grad-CAM overlay as a Secondary Capture image, not for diagnosis.

Both name the algorithm as IHE AI Results (AIR) asks: an item of the Contributing Equipment
Sequence whose Purpose of Reference is (Newcode1, 99IHE, "Processing Algorithm"), with the
manufacturer, the model name, the software version and a Device UID derived from the model's
name, version and weights digest (so it changes with every model). Attributes copied from a
source film are copied only when valid for their VR (``dicom_io.valid_values``); one left out is
logged once per document, by name only.

TID 1600's image library is not used: highdicom builds it only from CR/DX
headers carrying PatientOrientation and ImagerPixelSpacing, and not from the
SC-wrapped radiographs that are screened too. Each measurement group names its
source image instead, and every image is listed in the document's
CurrentRequestedProcedureEvidenceSequence.

``read_screening_report`` reads a report back through highdicom's template
accessors, so a round trip shows the document is well-formed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from dicom_io.valid_values import LeftOut, valid_copy
from model.artifact import study_flagged

log = logging.getLogger(__name__)

MANUFACTURER = "pneumoscreen"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent
PROBABILITY = codes.DCM.Probability
THRESHOLD = codes.DCM.ThresholdValue
NO_UNITS = codes.UCUM.NoUnits
COMMENT = codes.DCM.Comment
"""Concept name of an image's population note (TEXT)."""
STUDY_SUMMARY = "Study summary"
"""Tracking identifier of the study-level group; image groups are tracked by their SOPInstanceUID."""
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: screening aid, to be read with the original image"
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
"""IHE AIR's Purpose of Reference for the algorithm's item of the Contributing Equipment Sequence."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_WEIGHTS_PARAMETER = "weights_sha256="
# type 2 attributes highdicom reads from the first source; empty when a header lacks them
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                        "StudyTime", "AccessionNumber", "ReferringPhysicianName")
_SR_CLASSES = {Comprehensive3DSRStorage: Comprehensive3DSR, ComprehensiveSRStorage: ComprehensiveSR}


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced a result: named in every report (results name the exact model)."""

    name: str
    version: str
    weights_sha256: str
    threshold: float
    """The model's threshold, reported beside each probability (the flags themselves come with the results)."""

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.version.strip():
            raise ValueError(f"algorithm name and version must not be empty, got {self.name!r} {self.version!r}")
        if not _SHA256.fullmatch(self.weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lower-case hex digits, got {self.weights_sha256!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")

    def identification(self) -> AlgorithmIdentification:
        """TID 4019, with the weights' digest as a parameter."""
        return AlgorithmIdentification(name=self.name, version=self.version, manufacturer=MANUFACTURER,
                                       parameters=[f"{_WEIGHTS_PARAMETER}{self.weights_sha256}"])

    def device_uid(self) -> str:
        """The same UID for the same model (name, version and weights), another for any other, so
        observers and contributing equipment can be matched across reports."""
        return generate_uid(entropy_srcs=[MANUFACTURER, self.name, self.version, self.weights_sha256])

    def contributing_equipment(self) -> Dataset:
        """The algorithm's item of the Contributing Equipment Sequence (0018,A001), as IHE AIR has it."""
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
            PROCESSING_ALGORITHM.value, PROCESSING_ALGORITHM.scheme_designator, PROCESSING_ALGORITHM.meaning)
        item = Dataset()
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = self.name
        item.SoftwareVersions = self.version
        item.DeviceUID = self.device_uid()
        item.ContributionDescription = f"pneumonia screening by {self.name} {self.version}"
        item.PurposeOfReferenceCodeSequence = [purpose]
        return item


class ImageResult(NamedTuple):
    """One screened image in a report."""

    sop_instance_uid: str
    probability: float
    flagged: bool


@dataclass(frozen=True)
class ScreeningReport:
    """What ``read_screening_report`` found in an SR document."""

    study_instance_uid: str
    flagged: bool
    max_probability: float
    threshold: float
    model_name: str
    model_version: str
    weights_sha256: str
    images: tuple[ImageResult, ...]
    notes: dict[str, str] = field(default_factory=dict)
    """SOPInstanceUID -> population note, for the images whose patient is outside, or not known to
    be within, the model's intended population."""


def _check_probability(value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"a probability must be within [0, 1], got {value}")
    return value


def _header(ds: Dataset, left_out: set[LeftOut]) -> Dataset:
    """The source without its pixels and without the values invalid for their VR (added to
    ``left_out``), with absent type 2 patient/study attributes present and empty."""
    header, dropped = valid_copy(ds)
    left_out |= dropped
    missing = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
               if not header.get(kw)]
    if missing:
        raise ValueError(f"source image lacks {', '.join(missing)} (or its value is not a valid UID)")
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _log_left_out(left_out: set[LeftOut], document: str) -> None:
    """One line per attribute left out of ``document``: its name, never its value."""
    for attribute in sorted(left_out):
        log.warning("%s %s in the source film is not a valid %s: left out of the %s",
                    attribute.keyword, attribute.tag, attribute.VR, document)


def _add_algorithm_equipment(ds: Dataset, algorithm: AlgorithmInfo) -> None:
    equipment = list(ds.get("ContributingEquipmentSequence", []))
    ds.ContributingEquipmentSequence = [*equipment, algorithm.contributing_equipment()]


def _check_sources(sources: Sequence[Dataset], probabilities: Sequence[float],
                   flags: Sequence[bool]) -> list[Dataset]:
    if not sources:
        raise ValueError("no source images: a screening report needs at least one")
    if not len(sources) == len(probabilities) == len(flags):
        raise ValueError(f"{len(sources)} source images, {len(probabilities)} probabilities and {len(flags)} flags")
    left_out: set[LeftOut] = set()
    headers = [_header(ds, left_out) for ds in sources]
    _log_left_out(left_out, "screening report")
    studies = sorted({str(h.StudyInstanceUID) for h in headers})
    if len(studies) > 1:
        raise ValueError(f"source images span {len(studies)} studies ({', '.join(studies)}); "
                         "a report covers one study")
    uids = [str(h.SOPInstanceUID) for h in headers]
    if len(set(uids)) != len(uids):
        raise ValueError("the same SOPInstanceUID is listed twice among the source images")
    return headers


def _group(tracking: str, tracking_uid: str, probability: float, flagged: bool, algorithm: AlgorithmInfo,
           sources: Sequence[Dataset], derivation: Code | None = None,
           note: str | None = None) -> MeasurementsAndQualitativeEvaluations:
    flag = PRESENT if flagged else ABSENT
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=tracking),
        finding_type=PNEUMONIA,
        finding_sites=[FindingSite(codes.SCT.Lung)],
        measurements=[
            Measurement(PROBABILITY, probability, NO_UNITS, derivation=derivation,
                        algorithm_id=algorithm.identification()),
            Measurement(THRESHOLD, algorithm.threshold, NO_UNITS),
        ],
        qualitative_evaluations=[QualitativeEvaluation(PNEUMONIA, flag)],
        source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )
    if note:  # highdicom's group takes coded evaluations only; the note is free text
        group[0].ContentSequence.append(
            TextContentItem(name=COMMENT, value=note, relationship_type=RelationshipTypeValues.CONTAINS))
    return group


def build_screening_report(
    sources: Sequence[Dataset], probabilities: Sequence[float], flags: Sequence[bool], *, algorithm: AlgorithmInfo,
    sop_instance_uid: str, series_instance_uid: str | None = None, series_number: int = 9001,
    instance_number: int = 1, notes: Sequence[str | None] | None = None,
) -> Dataset:
    """A Comprehensive 3D SR holding a TID 1500 Measurement Report for one study.

    ``sources`` are the screened images (full datasets or headers), ``probabilities``
    the model's output for each and ``flags`` whether it was flagged (as recorded, by the model
    card's rule), in the same order. The study summary is flagged when any image is.
    ``notes``, in the same order too: each image's population note, or None.
    """
    headers = _check_sources(sources, probabilities, flags)
    values = [_check_probability(p) for p in probabilities]
    notes = list(notes) if notes is not None else [None] * len(headers)
    if len(notes) != len(headers):
        raise ValueError(f"{len(headers)} source images and {len(notes)} notes")
    groups = [
        _group(str(h.SOPInstanceUID), generate_uid(entropy_srcs=[sop_instance_uid, str(h.SOPInstanceUID)]),
               p, bool(f), algorithm, [h], note=note)
        for h, p, f, note in zip(headers, values, flags, notes)
    ]
    groups.append(_group(STUDY_SUMMARY, generate_uid(entropy_srcs=[sop_instance_uid, STUDY_SUMMARY]),
                         max(values), study_flagged(flags), algorithm, headers, derivation=codes.SCT.Maximum))
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid(), name=algorithm.name, manufacturer_name=MANUFACTURER,
            model_name=f"{algorithm.name} {algorithm.version}"),
    )
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    report = Comprehensive3DSR(
        evidence=headers, content=content[0],
        series_instance_uid=series_instance_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.name, software_versions=algorithm.version,
        series_description=f"{algorithm.name} pneumonia screening", is_complete=True,
    )
    _add_algorithm_equipment(report, algorithm)
    return report


def _algorithm_of(measurement: Measurement) -> tuple[str, str, str]:
    """(name, version, weights sha256) of the TID 4019 items on a measurement."""
    def texts(code: Code) -> list[str]:
        return [item.value for item in find_content_items(measurement[0], name=code)]

    names, versions = texts(codes.DCM.AlgorithmName), texts(codes.DCM.AlgorithmVersion)
    digests = [p[len(_WEIGHTS_PARAMETER):] for p in texts(codes.DCM.AlgorithmParameters)
               if p.startswith(_WEIGHTS_PARAMETER)]
    if len(names) != 1 or len(versions) != 1 or len(digests) != 1:
        raise ValueError("a measurement lacks its algorithm name, version or weights_sha256 parameter")
    return names[0], versions[0], digests[0]


def _read_group(group: MeasurementsAndQualitativeEvaluations) -> tuple[float, float, bool, tuple[str, str, str]]:
    """(probability, threshold, flagged, algorithm) of one measurement group."""
    probability, threshold = group.get_measurements(PROBABILITY), group.get_measurements(THRESHOLD)
    evaluations = group.get_qualitative_evaluations(PNEUMONIA)
    if len(probability) != 1 or len(threshold) != 1 or len(evaluations) != 1:
        raise ValueError(f"measurement group {group.tracking_identifier!r} lacks a probability, "
                         "threshold or Pneumonia present/absent item")
    flag = evaluations[0].value
    if flag not in (PRESENT, ABSENT):
        raise ValueError(f"unexpected Pneumonia evaluation {flag.meaning!r}")
    return float(probability[0].value), float(threshold[0].value), flag == PRESENT, _algorithm_of(probability[0])


def read_screening_report(ds: Dataset) -> ScreeningReport:
    """Read a report made by ``build_screening_report`` back through highdicom."""
    sr_class = _SR_CLASSES.get(ds.get("SOPClassUID"))
    if sr_class is None:
        raise ValueError(f"not a Comprehensive (3D) SR document: SOPClassUID {ds.get('SOPClassUID')}")
    report = sr_class.from_dataset(ds).content
    if not isinstance(report, MeasurementReport):
        raise ValueError("the SR document does not hold a TID 1500 Measurement Report")
    groups = report.get_image_measurement_groups(finding_type=PNEUMONIA)
    summaries = [g for g in groups if g.tracking_identifier == STUDY_SUMMARY]
    if len(summaries) != 1:
        raise ValueError(f"expected one {STUDY_SUMMARY!r} group, found {len(summaries)}")
    max_probability, threshold, flagged, algorithm = _read_group(summaries[0])
    images, notes = [], {}
    for group in groups:
        if group is summaries[0]:
            continue
        probability, image_threshold, image_flagged, image_algorithm = _read_group(group)
        if (image_threshold, image_algorithm) != (threshold, algorithm):
            raise ValueError(f"image group {group.tracking_identifier!r} names another algorithm or threshold")
        sources = group.source_images
        if len(sources) != 1:
            raise ValueError(f"image group {group.tracking_identifier!r} references {len(sources)} images")
        uid = str(sources[0].referenced_sop_instance_uid)
        images.append(ImageResult(uid, probability, image_flagged))
        comments = find_content_items(group[0], name=COMMENT, value_type=ValueTypeValues.TEXT)
        if comments:
            notes[uid] = "; ".join(str(item.value) for item in comments)
    return ScreeningReport(
        study_instance_uid=str(ds.StudyInstanceUID), flagged=flagged, max_probability=max_probability,
        threshold=threshold, model_name=algorithm[0], model_version=algorithm[1], weights_sha256=algorithm[2],
        images=tuple(images), notes=notes,
    )


def build_heatmap_capture(
    source: Dataset, overlay_rgb: np.ndarray, *, algorithm: AlgorithmInfo, probability: float,
    sop_instance_uid: str, series_instance_uid: str, series_number: int = 9002, instance_number: int = 1,
) -> Dataset:
    """The Grad-CAM overlay of ``source`` as a Secondary Capture image in the source's study.

    A screening aid, not for diagnosis: ImageComments and the series description say so.
    """
    probability = _check_probability(probability)
    overlay = np.asarray(overlay_rgb)
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8 or min(overlay.shape[:2]) < 1:
        raise ValueError(f"overlay_rgb must be a (rows, columns, 3) uint8 array, got {overlay.shape} {overlay.dtype}")
    left_out: set[LeftOut] = set()
    header = _header(source, left_out)
    _log_left_out(left_out, "heatmap")
    orientation = header.get("PatientOrientation")
    # a frontal chest film is displayed with the patient's left to the right, feet down
    orientation = tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=np.ascontiguousarray(overlay), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation,
        series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=instance_number, manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name, software_versions=algorithm.version,
        series_description=f"{algorithm.name} heatmap (not for diagnosis)",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.DerivationDescription = (f"Grad-CAM heatmap of {algorithm.name} {algorithm.version} "
                                f"(weights sha256 {algorithm.weights_sha256[:12]}), "
                                f"pneumonia probability {probability:.3f}")[:1024]
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.BurnedInAnnotation = "NO"
    sc.BodyPartExamined = "CHEST"  # an unpaired part: General Series' Laterality is not required
    _add_algorithm_equipment(sc, algorithm)
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = header.SOPClassUID
    referenced.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [referenced]
    return sc
