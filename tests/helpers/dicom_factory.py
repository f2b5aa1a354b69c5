"""Generate chest X-ray DICOM files for tests from the fixture JPEGs.

A baseline JPEG can be wrapped as it is (JPEG Baseline transfer syntax, like
the RSNA pneumonia challenge's Secondary Capture objects) or decoded and
stored uncompressed. The planted patient name, ID and birth date let tests check
that they never reach a log line. The planted birth date makes the patient a
child of three at the study, within the shipped model's intended population
(ages 1-5): the films are screened.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "images"
NORMAL_JPEG = FIXTURES / "NORMAL" / "IM-0115-0001.jpeg"
PNEUMONIA_JPEG = FIXTURES / "PNEUMONIA" / "person1003_virus_1685.jpeg"
PLANTED_PATIENT_NAME = "Zyxwvut^Plantedname"
PLANTED_PATIENT_ID = "PID-97531-PLANTED"
PLANTED_BIRTH_DATE = "20230101"

SOP_CLASSES = {
    "SC": SecondaryCaptureImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}


def chest_dataset(
    jpeg_path: Path = PNEUMONIA_JPEG, *, transfer_syntax: str = ExplicitVRLittleEndian, sop_class: str = "SC",
    modality: str = "CR", photometric: str = "MONOCHROME2", study_uid: str | None = None,
    series_uid: str | None = None, accession: str = "ACC0001", view_position: str | None = "PA",
    body_part: str | None = "CHEST", presentation_intent: str = "FOR PRESENTATION",
    birth_date: str | None = PLANTED_BIRTH_DATE, patient_age: str | None = None,
) -> Dataset:
    """A chest radiograph dataset built from ``jpeg_path`` (``birth_date`` / ``patient_age`` None:
    the attribute is left out)."""
    pixels = cv2.imread(str(jpeg_path), cv2.IMREAD_GRAYSCALE)
    rows, columns = pixels.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[sop_class]
    ds.SOPClassUID = SOP_CLASSES[sop_class]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = PLANTED_PATIENT_NAME
    ds.PatientID = PLANTED_PATIENT_ID
    if birth_date is not None:
        ds.PatientBirthDate = birth_date
    if patient_age is not None:
        ds.PatientAge = patient_age
    ds.AccessionNumber = accession
    ds.Modality = modality
    if sop_class == "DX":
        ds.PresentationIntentType = presentation_intent
    if body_part:
        ds.BodyPartExamined = body_part
    if view_position:
        ds.ViewPosition = view_position
    ds.StudyDate, ds.StudyTime = "20261126", "101500"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if transfer_syntax == JPEGBaseline8Bit:
        if photometric != "MONOCHROME2":
            raise ValueError("the fixture JPEGs are MONOCHROME2")
        ds.PixelData = encapsulate([jpeg_path.read_bytes()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    else:
        stored = 255 - pixels if photometric == "MONOCHROME1" else pixels
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds["PixelData"].VR = "OB"
    return ds


def write_chest_dicom(path: Path, jpeg_path: Path = PNEUMONIA_JPEG, **kwargs) -> Dataset:
    ds = chest_dataset(jpeg_path, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds
