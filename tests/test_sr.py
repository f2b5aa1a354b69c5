"""The screening report (TID 1500 in a Comprehensive 3D SR) and the heatmap
Secondary Capture: written to bytes, read back with pydicom and highdicom."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid

from dicom_io.sr import (
    NOT_FOR_DIAGNOSIS,
    AlgorithmInfo,
    ImageResult,
    build_heatmap_capture,
    build_screening_report,
    read_screening_report,
)
from tests.helpers.dicom_factory import (
    NORMAL_JPEG,
    PLANTED_BIRTH_DATE,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    PNEUMONIA_JPEG,
    chest_dataset,
)

ALGORITHM = AlgorithmInfo(name="pneumonet", version="1.4.2", weights_sha256="0123456789abcdef" * 4, threshold=0.5)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def round_trip(ds: Dataset) -> Dataset:
    return dcmread(io.BytesIO(_bytes(ds)))


@pytest.fixture
def study() -> list[Dataset]:
    """Three images of one study: CR, SC-wrapped CR and DX, the last a header read without pixels."""
    uid = generate_uid()
    images = [
        chest_dataset(PNEUMONIA_JPEG, sop_class="CR", study_uid=uid),
        chest_dataset(NORMAL_JPEG, sop_class="SC", study_uid=uid),
        chest_dataset(NORMAL_JPEG, sop_class="DX", modality="DX", study_uid=uid),
    ]
    for ds in images:
        ds.PatientSex, ds.StudyID = "F", "S1"
    images[2] = dcmread(io.BytesIO(_bytes(images[2])), stop_before_pixels=True)
    return images


def test_report_reads_back_with_every_field(study):
    uid = generate_uid()
    ds = round_trip(build_screening_report(study, [0.91, 0.2, 0.49], [True, False, False], algorithm=ALGORITHM,
                                           sop_instance_uid=uid))
    report = read_screening_report(ds)

    assert ds.SOPClassUID == Comprehensive3DSRStorage and ds.SOPInstanceUID == uid and ds.Modality == "SR"
    assert report.study_instance_uid == study[0].StudyInstanceUID
    assert report.flagged is True and report.max_probability == pytest.approx(0.91)
    assert report.threshold == pytest.approx(0.5)
    assert (report.model_name, report.model_version, report.weights_sha256) == (
        ALGORITHM.name, ALGORITHM.version, ALGORITHM.weights_sha256)
    assert report.images == (
        ImageResult(study[0].SOPInstanceUID, pytest.approx(0.91), True),
        ImageResult(study[1].SOPInstanceUID, pytest.approx(0.2), False),
        ImageResult(study[2].SOPInstanceUID, pytest.approx(0.49), False),
    )


def test_population_notes_are_comments_in_their_images_groups_and_read_back(study):
    unknown = "age unknown: not confirmed within the intended population (ages 1-5)"
    outside = "outside the intended population: patient aged 45 years (trained on ages 1-5)"
    ds = round_trip(build_screening_report(study, [0.91, 0.2, 0.49], [True, False, False], algorithm=ALGORITHM,
                                           sop_instance_uid=generate_uid(), notes=[outside, None, unknown]))
    report = read_screening_report(ds)

    assert report.notes == {study[0].SOPInstanceUID: outside, study[2].SOPInstanceUID: unknown}
    groups = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
    comments = {group.tracking_identifier: [item.value for item in hd.sr.utils.find_content_items(
        group[0], name=hd.sr.CodedConcept("121106", "DCM", "Comment"))] for group in groups}
    assert comments == {study[0].SOPInstanceUID: [outside], study[1].SOPInstanceUID: [],
                        study[2].SOPInstanceUID: [unknown], "Study summary": []}
    plain = read_screening_report(round_trip(build_screening_report(
        study, [0.1, 0.2, 0.3], [False] * 3, algorithm=ALGORITHM, sop_instance_uid=generate_uid())))
    assert plain.notes == {}
    with pytest.raises(ValueError, match="3 source images and 1 notes"):
        build_screening_report(study, [0.1, 0.2, 0.3], [False] * 3, algorithm=ALGORITHM,
                               sop_instance_uid=generate_uid(), notes=[unknown])


def test_report_copies_the_patient_and_study_modules_and_lists_the_sources_as_evidence(study):
    ds = round_trip(build_screening_report(study, [0.1, 0.2, 0.3], [False, False, False], algorithm=ALGORITHM,
                                           sop_instance_uid=generate_uid(), series_number=9001))
    assert str(ds.PatientName) == PLANTED_PATIENT_NAME and ds.PatientID == PLANTED_PATIENT_ID
    assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyID) == (PLANTED_BIRTH_DATE, "F", "S1")
    assert (ds.StudyInstanceUID, ds.AccessionNumber, ds.StudyDate) == (study[0].StudyInstanceUID, "ACC0001",
                                                                       "20261126")
    assert ds.SeriesNumber == 9001 and ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in study}
    assert ds.Manufacturer == "pneumoscreen" and ds.CompletionFlag == "COMPLETE"

    evidence = hd.sr.Comprehensive3DSR.from_dataset(ds).get_evidence(current_procedure_only=True)
    assert {(e[1], e[2], e[3]) for e in evidence} == {
        (s.SeriesInstanceUID, s.SOPInstanceUID, s.SOPClassUID) for s in study}


def test_report_names_the_device_observer_and_chest_radiograph_procedure(study):
    ds = round_trip(build_screening_report(study[:1], [0.7], [True], algorithm=ALGORITHM,
                                           sop_instance_uid=generate_uid()))
    content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    [observer] = content.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    device = observer.observer_identifying_attributes
    assert (device.name, device.manufacturer_name) == ("pneumonet", "pneumoscreen")
    assert device.model_name == "pneumonet 1.4.2"
    procedure = hd.sr.utils.find_content_items(content[0], name=hd.sr.CodedConcept("121058", "DCM",
                                                                                  "Procedure reported"))
    assert [(p.value.value, p.value.scheme_designator) for p in procedure] == [("399208008", "SCT")]
    group = content.get_image_measurement_groups(referenced_sop_instance_uid=study[0].SOPInstanceUID)
    assert len(group) == 2  # the image's own group and the study summary
    [probability] = group[0].get_measurements(hd.sr.CodedConcept("122157", "DCM", "Probability"))
    assert (probability.unit.value, probability.unit.scheme_designator) == ("1", "UCUM")
    [evaluation] = group[0].get_qualitative_evaluations(hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"))
    assert evaluation.value.value == "52101004"  # Present


@pytest.mark.parametrize(("probabilities", "flagged"), [((0.1, 0.2, 0.3), False), ((0.1, 0.5, 0.3), True)])
def test_study_is_flagged_when_any_image_reaches_the_threshold(study, probabilities, flagged):
    report = read_screening_report(round_trip(build_screening_report(
        study, probabilities, [p >= ALGORITHM.threshold for p in probabilities], algorithm=ALGORITHM,
        sop_instance_uid=generate_uid())))
    assert report.flagged is flagged
    assert report.max_probability == pytest.approx(max(probabilities))
    assert [image.flagged for image in report.images] == [p >= 0.5 for p in probabilities]


def test_report_keeps_probabilities_to_the_precision_of_a_decimal_string(study):
    report = read_screening_report(round_trip(build_screening_report(
        study[:1], [0.123456789012345], [False], algorithm=ALGORITHM, sop_instance_uid=generate_uid())))
    assert report.images[0].probability == pytest.approx(0.123456789012345, abs=1e-12)


def test_report_refuses_invalid_input(study):
    def build(sources, probabilities, flags=None):
        flags = [False] * len(sources) if flags is None else flags
        return build_screening_report(sources, probabilities, flags, algorithm=ALGORITHM,
                                      sop_instance_uid=generate_uid())

    with pytest.raises(ValueError, match="no source images"):
        build([], [])
    with pytest.raises(ValueError, match="3 source images, 2 probabilities and 3 flags"):
        build(study, [0.1, 0.2])
    with pytest.raises(ValueError, match="3 source images, 3 probabilities and 1 flags"):
        build(study, [0.1, 0.2, 0.3], [True])
    with pytest.raises(ValueError, match=r"within \[0, 1\], got 1.5"):
        build(study, [0.1, 1.5, 0.2])
    with pytest.raises(ValueError, match=r"within \[0, 1\], got nan"):
        build(study, [0.1, float("nan"), 0.2])
    other_study = chest_dataset(NORMAL_JPEG, sop_class="CR")
    with pytest.raises(ValueError, match="span 2 studies"):
        build([study[0], other_study], [0.1, 0.2])
    with pytest.raises(ValueError, match="listed twice"):
        build([study[0], study[0]], [0.1, 0.2])


def test_algorithm_info_is_validated():
    with pytest.raises(ValueError, match="threshold must be within"):
        AlgorithmInfo("m", "1", "0" * 64, 1.2)
    with pytest.raises(ValueError, match="64 lower-case hex digits"):
        AlgorithmInfo("m", "1", "xyz", 0.5)
    with pytest.raises(ValueError, match="must not be empty"):
        AlgorithmInfo("", "1", "0" * 64, 0.5)


def test_reading_a_document_that_is_not_a_screening_report_fails_clearly(study):
    with pytest.raises(ValueError, match="not a Comprehensive"):
        read_screening_report(study[0])


def test_heatmap_capture_round_trips_its_pixels_in_the_source_study(study):
    rng = np.random.default_rng(7)
    overlay = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    uid, series = generate_uid(), generate_uid()
    ds = round_trip(build_heatmap_capture(study[0], overlay, algorithm=ALGORITHM, probability=0.91,
                                          sop_instance_uid=uid, series_instance_uid=series))

    assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.SOPInstanceUID == uid
    assert ds.SeriesInstanceUID == series and ds.SeriesNumber == 9002
    assert ds.StudyInstanceUID == study[0].StudyInstanceUID and ds.PatientID == PLANTED_PATIENT_ID
    assert ds.PhotometricInterpretation == "RGB" and (ds.Rows, ds.Columns) == (96, 80)
    assert np.array_equal(ds.pixel_array, overlay)
    assert np.array_equal(hd.imread(io.BytesIO(_bytes(ds))).get_frame(1), overlay)
    assert "pneumonet 1.4.2" in ds.DerivationDescription and "0.910" in ds.DerivationDescription
    assert ds.ImageComments == NOT_FOR_DIAGNOSIS and ds.BurnedInAnnotation == "NO"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == study[0].SOPInstanceUID


def test_heatmap_capture_refuses_a_non_rgb_overlay(study):
    with pytest.raises(ValueError, match=r"\(rows, columns, 3\) uint8"):
        build_heatmap_capture(study[0], np.zeros((32, 32), np.uint8), algorithm=ALGORITHM, probability=0.5,
                              sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
