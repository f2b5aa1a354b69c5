"""Pixel decoding edge cases (the corpus in test_ingest.py covers each encoding and LUT case)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_factory import PNEUMONIA_JPEG, chest_dataset
from dicom_io.pixels import PixelDecodeError, display_image


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
