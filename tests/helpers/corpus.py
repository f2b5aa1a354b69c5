"""A generated DICOM corpus: every transfer syntax the listener accepts, each
photometric interpretation, bit depth and LUT case, and malformed files.

Each pixel case is built from one fixture radiograph so that the expected
display image is known: the original 8-bit grey image (exactly for lossless
encodings, within a tolerance for lossy ones). Compressed variants are made
with dcmtk (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle) and with pydicom's
encoders, as real senders would make them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tests.helpers.dicom_factory import PNEUMONIA_JPEG, chest_dataset

ORIGINAL = cv2.imread(str(PNEUMONIA_JPEG), cv2.IMREAD_GRAYSCALE)


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    transfer_syntax: str
    tolerance: float  # largest mean absolute difference allowed from ORIGINAL (0 = exact)
    max_error: int  # largest single-pixel difference allowed


def _base(**kwargs) -> Dataset:
    ds = chest_dataset(PNEUMONIA_JPEG, **kwargs)
    ds.StudyInstanceUID = generate_uid()
    return ds


def _sixteen_bit(ds: Dataset, stored: np.ndarray, *, bits_stored: int, signed: bool = False) -> Dataset:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def pixel_datasets() -> dict[str, tuple[Dataset, int]]:
    """name -> (uncompressed dataset, max error of the case itself before any encoding)."""
    o = ORIGINAL.astype(np.int32)
    cases: dict[str, tuple[Dataset, int]] = {"mono2_8bit": (_base(), 0)}

    ds = _base(photometric="MONOCHROME1")
    cases["mono1_8bit"] = (ds, 0)

    ds = _sixteen_bit(_base(), o * 16, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    cases["12bit_window"] = (ds, 1)

    ds = _sixteen_bit(_base(), o * 10 - 1000, bits_stored=16, signed=True)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.5, 100, "US"
    ds.WindowCenter, ds.WindowWidth = 237.5, 1276
    cases["16bit_signed_rescale_window"] = (ds, 1)

    ds = _sixteen_bit(_base(), o * 16, bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = ((np.arange(4096) // 16) * 257).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    cases["12bit_voi_lut_sequence"] = (ds, 0)

    ds = _sixteen_bit(_base(photometric="MONOCHROME1"), (255 - o) * 16, bits_stored=12)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    cases["mono1_12bit_window"] = (ds, 1)

    ds = _base()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(ORIGINAL[..., None], 3, axis=-1).tobytes()
    cases["rgb_8bit"] = (ds, 0)

    ds = _base()
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([ORIGINAL, 255 - ORIGINAL]).tobytes()
    cases["multiframe_first_frame"] = (ds, 0)
    return cases


# (suffix, transfer syntax, tool, mean tolerance, max error) per encoding; tool is
# a dcmtk command line or "pydicom"
_ENCODINGS_8BIT = [
    ("implicit", ImplicitVRLittleEndian, ["dcmconv", "+ti"], 0, 0),
    ("bigendian", ExplicitVRBigEndian, ["dcmconv", "+tb"], 0, 0),
    ("deflate", DeflatedExplicitVRLittleEndian, ["dcmconv", "+td"], 0, 0),
    ("jpeg_baseline", JPEGBaseline8Bit, ["dcmcjpeg", "+eb"], 2.0, 40),
    ("jpeg_lossless_sv1", JPEGLosslessSV1, ["dcmcjpeg", "+e1"], 0, 0),
    ("jpegls_lossless", JPEGLSLossless, ["dcmcjpls", "+el"], 0, 0),
    ("jpegls_near", JPEGLSNearLossless, ["dcmcjpls", "+en"], 2.0, 2),
    ("rle", RLELossless, ["dcmcrle"], 0, 0),
    ("j2k_lossless", JPEG2000Lossless, "pydicom", 0, 0),
    ("j2k_lossy", JPEG2000, "pydicom", 2.0, 40),
]
_ENCODINGS_12BIT = [
    ("jpeg_extended", JPEGExtended12Bit, ["dcmcjpeg", "+ee"], 2.0, 40),
    ("jpegls_lossless", JPEGLSLossless, ["dcmcjpls", "+el"], 0, 0),
    ("rle", RLELossless, ["dcmcrle"], 0, 0),
    ("j2k_lossless", JPEG2000Lossless, "pydicom", 0, 0),
    ("bigendian", ExplicitVRBigEndian, ["dcmconv", "+tb"], 0, 0),
]


def _encode(src: Path, dst: Path, syntax: str, tool) -> None:
    if tool == "pydicom":
        ds = dcmread(src)
        kwargs = {"j2k_cr": [20]} if syntax == JPEG2000 else {}
        ds.compress(syntax, **kwargs)
        ds.save_as(dst, enforce_file_format=True)
        return
    exe = shutil.which(tool[0])
    if exe is None:
        raise RuntimeError(f"dcmtk's {tool[0]} is not installed (apt-get install dcmtk)")
    subprocess.run([exe, *tool[1:], str(src), str(dst)], check=True, capture_output=True, timeout=60)
    if dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID != syntax:
        raise RuntimeError(f"{tool} did not produce {syntax}")


def build_pixel_corpus(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (ds, own_error) in pixel_datasets().items():
        src = folder / f"{name}.dcm"
        ds.save_as(src, enforce_file_format=True)
        cases.append(Case(name, src, ExplicitVRLittleEndian, 1.0 if own_error else 0, own_error))
        if name in ("mono2_8bit", "mono1_8bit"):
            encodings = _ENCODINGS_8BIT if name == "mono2_8bit" else _ENCODINGS_8BIT[:1] + _ENCODINGS_8BIT[4:6]
        elif name in ("12bit_window", "mono1_12bit_window"):
            encodings = _ENCODINGS_12BIT
        elif name == "rgb_8bit":
            encodings = [("jpeg_baseline", JPEGBaseline8Bit, ["dcmcjpeg", "+eb"], 2.0, 40),
                         ("rle", RLELossless, ["dcmcrle"], 0, 0)]
        else:
            encodings = []
        for suffix, syntax, tool, tolerance, max_error in encodings:
            dst = folder / f"{name}__{suffix}.dcm"
            _encode(src, dst, syntax, tool)
            # a fresh SOP Instance UID per file, so each is its own instance
            ds2 = dcmread(dst)
            ds2.SOPInstanceUID = ds2.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds2.save_as(dst, enforce_file_format=True)
            cases.append(Case(f"{name}__{suffix}", dst, syntax, max(tolerance, 1.0 if own_error else 0),
                              max_error + own_error))
    return cases


def build_malformed(folder: Path) -> dict[str, Path]:
    """Files a sender may produce that cannot be screened; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    ds = _base()
    ds.save_as(folder / "tmp.dcm", enforce_file_format=True)
    raw = (folder / "tmp.dcm").read_bytes()
    out["truncated_pixels"] = folder / "truncated_pixels.dcm"
    out["truncated_pixels"].write_bytes(raw[: len(raw) - len(raw) // 3])

    ds = _base()
    del ds.PixelData
    out["no_pixel_data"] = folder / "no_pixel_data.dcm"
    ds.save_as(out["no_pixel_data"], enforce_file_format=True)

    ds = _base(transfer_syntax=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(range(256)) * 8 + b"\xff\xd9"])
    out["bad_codestream"] = folder / "bad_codestream.dcm"
    ds.save_as(out["bad_codestream"], enforce_file_format=True)

    ds = _base()
    ds[0x00280010] = DataElement(0x00280010, "LO", "not-a-number")  # Rows with the wrong VR
    out["wrong_vr_rows"] = folder / "wrong_vr_rows.dcm"
    ds.save_as(out["wrong_vr_rows"], enforce_file_format=True)

    ds = _base()
    ds.Rows, ds.Columns = 60000, 60000  # claims 3.6 Gpixel, carries 100 kB
    out["huge_dimensions"] = folder / "huge_dimensions.dcm"
    ds.save_as(out["huge_dimensions"], enforce_file_format=True)

    (folder / "tmp.dcm").unlink()
    return out
