"""The screening report (TID 1500 in a Comprehensive 3D SR) and the heatmap
Secondary Capture: written to bytes, read back with pydicom (strictly: the session's
validation raises on any invalid value) and with highdicom's own parsers; IHE AIR's
contributing equipment; source attributes invalid for their VR left out; dciodvfy
(dicom3tools) finds no error in either, made from pydicom-data's real films and ours."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid

from dicom_io.sr import (
    NOT_FOR_DIAGNOSIS,
    PROCESSING_ALGORITHM,
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


def _algorithm_items(ds: Dataset) -> list[Dataset]:
    return [item for item in ds.ContributingEquipmentSequence
            if [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in item.PurposeOfReferenceCodeSequence]
            == [("Newcode1", "99IHE", "Processing Algorithm")]]


def _heatmap(source: Dataset, algorithm: AlgorithmInfo = ALGORITHM) -> Dataset:
    overlay = np.random.default_rng(3).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    return build_heatmap_capture(source, overlay, algorithm=algorithm, probability=0.7,
                                 sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())


def _report(sources: list[Dataset], algorithm: AlgorithmInfo = ALGORITHM) -> Dataset:
    return build_screening_report(sources, [0.7] * len(sources), [True] * len(sources), algorithm=algorithm,
                                  sop_instance_uid=generate_uid())


def test_report_and_heatmap_name_the_algorithm_as_ihe_air_contributing_equipment(study):
    for ds in (round_trip(_report(study)), round_trip(_heatmap(study[0]))):
        [item] = _algorithm_items(ds)
        assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == (
            "pneumoscreen", "pneumonet", "1.4.2")
        assert item.DeviceUID == ALGORITHM.device_uid()
        # highdicom's own items (the library, the source's acquisition equipment) stay beside ours
        assert len(ds.ContributingEquipmentSequence) >= 2
    assert PROCESSING_ALGORITHM.value == "Newcode1"


def test_the_device_uid_changes_with_every_model_and_only_with_it():
    same = AlgorithmInfo(name="pneumonet", version="1.4.2", weights_sha256="0123456789abcdef" * 4, threshold=0.3)
    assert same.device_uid() == ALGORITHM.device_uid()  # a new operating point is the same model
    others = [AlgorithmInfo("pneumonet", "1.4.3", ALGORITHM.weights_sha256, 0.5),
              AlgorithmInfo("pneumonet", "1.4.2", "f" * 64, 0.5),
              AlgorithmInfo("othernet", "1.4.2", ALGORITHM.weights_sha256, 0.5)]
    assert len({ALGORITHM.device_uid(), *(a.device_uid() for a in others)}) == 4


def _film_with_an_invalid_age(**kwargs) -> Dataset:
    """A film as a modality sent it: a Patient's Age without its unit, read back from its bytes."""
    return round_trip(chest_dataset(PNEUMONIA_JPEG, sop_class="CR", patient_age="51", **kwargs))


def test_source_attributes_invalid_for_their_vr_are_left_out_and_logged_once_by_name(invalid_dicom_allowed,
                                                                                     caplog):
    # the films carry an invalid value on purpose: pydicom must let the test make and read them
    uid = generate_uid()
    films = [_film_with_an_invalid_age(study_uid=uid), _film_with_an_invalid_age(study_uid=uid)]
    caplog.clear()  # pydicom's own warnings while the test made them; from here on, pydicom must log none
    with caplog.at_level(logging.WARNING):
        report = round_trip(_report(films))
        heatmap = round_trip(_heatmap(films[0]))
    assert "PatientAge" not in report and "PatientAge" not in heatmap
    assert str(report.PatientName) == PLANTED_PATIENT_NAME and heatmap.PatientID == PLANTED_PATIENT_ID
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_io.sr"]
    assert lines == ["PatientAge (0010,1010) in the source film is not a valid AS: left out of the screening report",
                     "PatientAge (0010,1010) in the source film is not a valid AS: left out of the heatmap"]
    for text in (PLANTED_PATIENT_NAME, PLANTED_PATIENT_ID, PLANTED_BIRTH_DATE, "'51'"):
        assert text not in caplog.text
    valid = round_trip(_report([chest_dataset(PNEUMONIA_JPEG, sop_class="CR", patient_age="045Y")]))
    assert valid.PatientAge == "045Y"


def _read_strictly(data: bytes) -> Dataset:
    ds = dcmread(io.BytesIO(data))
    for element in ds.iterall():
        element.value  # noqa: B018  (converting each value validates it: the session's mode raises)
    return ds


def test_report_and_heatmap_read_back_strictly_by_pydicom_and_by_highdicoms_parsers(study):
    report_bytes, heatmap_bytes = _bytes(_report(study)), _bytes(_heatmap(study[0]))
    _read_strictly(report_bytes), _read_strictly(heatmap_bytes)

    document = hd.sr.srread(io.BytesIO(report_bytes))
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    assert isinstance(document.content, hd.sr.MeasurementReport)
    [observer] = document.content.get_observer_contexts(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    assert observer.observer_identifying_attributes.uid == ALGORITHM.device_uid()

    image = hd.imread(io.BytesIO(heatmap_bytes))
    assert image.SOPClassUID == SecondaryCaptureImageStorage
    assert hd.Image.from_dataset(dcmread(io.BytesIO(heatmap_bytes))).get_frame(1).shape == (64, 48, 3)


DCIODVFY = shutil.which("dciodvfy")


def _source(name: str, request) -> Dataset:
    """A source film: one of pydicom-data's real files, or one of ours."""
    if name == "factory CR":
        return chest_dataset(PNEUMONIA_JPEG, sop_class="CR")
    if name == "factory DX":
        return round_trip(chest_dataset(NORMAL_JPEG, sop_class="DX", modality="DX"))
    if name == "factory SC":
        return chest_dataset(NORMAL_JPEG, sop_class="SC")
    if name == "invalid values":
        request.getfixturevalue("invalid_dicom_allowed")  # this film is invalid on purpose
        film = chest_dataset(PNEUMONIA_JPEG, sop_class="CR", patient_age="51", body_part="chest")
        film.StudyTime = "25:61"
        return round_trip(film)
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data's {name} is not installed (pip install pydicom-data)"
    return dcmread(path)


def _dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    dcmwrite(path, ds, enforce_file_format=True)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "MR2_UNCR.dcm", "CT_small.dcm", "factory CR",
                                  "factory DX", "factory SC", "invalid values"])
def test_dciodvfy_reports_no_error_on_the_report_and_the_heatmap(name, request, tmp_path):
    if DCIODVFY is None:
        pytest.fail("dciodvfy is not installed: apt-get install dicom3tools (.ci/run does)")
    source = _source(name, request)
    assert _dciodvfy_errors(_report([source]), tmp_path / "sr.dcm") == []
    assert _dciodvfy_errors(_heatmap(source), tmp_path / "sc.dcm") == []
