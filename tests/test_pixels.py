"""Pixel decoding edge cases (the corpus in test_ingest.py covers each encoding and LUT case)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_io.pixels import PixelDecodeError, display_image
from tests.helpers.dicom_factory import PNEUMONIA_JPEG, chest_dataset


def test_missing_pixel_data_is_a_decode_error():
    ds = chest_dataset(PNEUMONIA_JPEG)
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="no Pixel Data"):
        display_image(ds)


def test_real_signed_rescaled_file_decodes():
    ds = dcmread(get_testdata_file("CT_small.dcm"))  # 16-bit signed with rescale
    out = display_image(ds)
    assert out.shape == (ds.Rows, ds.Columns) and out.dtype == np.uint8
    assert out.std() > 10


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"])
def test_real_compressed_files_decode(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom test file {name} is not available")
    out = display_image(dcmread(path))
    assert out.ndim == 2 and out.dtype == np.uint8 and out.std() > 1


def test_pixel_padding_is_left_out_of_the_auto_range_and_shown_black():
    ds = chest_dataset(PNEUMONIA_JPEG)
    original = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns).astype(np.uint16)
    stored = original * 16 + 1000  # 1000..5080: the image proper
    stored[:, :20] = 0  # collimator border, marked as padding
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 13, 12
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = 0
    out = display_image(ds)
    assert (out[:, :20] == 0).all()
    inner = original[:, 20:]
    expected = np.rint((inner.astype(float) - inner.min()) * 255 / (inner.max() - inner.min()))
    assert np.abs(out[:, 20:].astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("photometric, shape, inverted", [
    ("MONOCHROME2", None, False), ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", "INVERSE", True),  # shown inverted by a viewer, so screened inverted
    ("MONOCHROME1", None, True), ("MONOCHROME1", "INVERSE", True),  # DX: one inversion, not two
])
def test_presentation_lut_shape_inverse_is_applied_once(photometric, shape, inverted):
    ds = chest_dataset(PNEUMONIA_JPEG)
    stored = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)
    ds.PhotometricInterpretation = photometric
    if shape:
        ds.PresentationLUTShape = shape
    out = display_image(ds)
    assert np.array_equal(out, 255 - stored if inverted else stored)
