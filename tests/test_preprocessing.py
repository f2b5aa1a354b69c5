"""The one preprocessing path: golden output, and the same tensor whether the
image arrives as a JPEG file or inside a DICOM file."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_io.pixels import display_image
from model.preprocessing import INPUT_SIZE, normalize_contrast, prepare, prepare_file, read_image_file, to_model_input
from tests.helpers.dicom_factory import PNEUMONIA_JPEG, write_chest_dicom

# sha256 of prepare()'s bytes for the fixture: a change here changes what the
# shipped model sees, and needs a new PREPROCESSING_VERSION and a retrained model.
GOLDEN_SHA256 = "254ffa24a2c5bcc27509c4ab39f8ec286585df2221bacead61e5e2b3b4a19a67"


def test_prepare_matches_golden_bytes():
    prepared = prepare_file(PNEUMONIA_JPEG)
    assert prepared.shape == (INPUT_SIZE, INPUT_SIZE) and prepared.dtype == np.uint8
    assert hashlib.sha256(prepared.tobytes()).hexdigest() == GOLDEN_SHA256


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_uncompressed_dicom_gives_byte_identical_tensor_to_the_jpeg(tmp_path, photometric):
    write_chest_dicom(tmp_path / "x.dcm", PNEUMONIA_JPEG, transfer_syntax=ExplicitVRLittleEndian,
                      photometric=photometric)
    from_dicom = prepare(display_image(dcmread(tmp_path / "x.dcm")))
    assert np.array_equal(from_dicom, prepare_file(PNEUMONIA_JPEG))


def test_jpeg_baseline_dicom_decodes_to_the_same_image_within_decoder_rounding(tmp_path):
    write_chest_dicom(tmp_path / "x.dcm", PNEUMONIA_JPEG, transfer_syntax=JPEGBaseline8Bit)
    from_dicom = display_image(dcmread(tmp_path / "x.dcm"))
    reference = read_image_file(PNEUMONIA_JPEG)
    diff = np.abs(from_dicom.astype(int) - reference.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.1


@pytest.mark.parametrize("value", [0.6, 1.6])
def test_a_display_gamma_barely_changes_the_prepared_image(value):
    # the same film exported with another tone curve: 30+ grey levels apart
    # when only resized, about one grey level apart once equalized
    film = read_image_file(PNEUMONIA_JPEG)
    lut = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** value), 0, 255).astype(np.uint8)
    other = cv2.LUT(film, lut)
    resized = [cv2.resize(x, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA).astype(int) for x in (film, other)]
    assert np.abs(resized[0] - resized[1]).mean() > 20
    assert np.abs(prepare(other).astype(int) - prepare(film).astype(int)).mean() < 2


def test_contrast_normalization_spreads_the_levels_and_keeps_a_blank_image_blank():
    ramp = np.tile(np.linspace(100, 140, INPUT_SIZE).astype(np.uint8), (INPUT_SIZE, 1))
    out = normalize_contrast(ramp)
    assert out.min() < 10 and out.max() == 255 and np.all(np.diff(out[0].astype(int)) >= 0)
    blank = np.full((INPUT_SIZE, INPUT_SIZE), 7, dtype=np.uint8)
    assert np.array_equal(normalize_contrast(blank), blank)


def test_colour_input_is_converted_to_grey_like_a_grey_read():
    grey = read_image_file(PNEUMONIA_JPEG)
    bgr = np.repeat(grey[..., None], 3, axis=-1)
    assert np.array_equal(prepare(bgr), prepare(grey))


def test_model_input_is_rgb_float_in_unit_range():
    prepared = prepare_file(PNEUMONIA_JPEG)
    x = to_model_input(prepared)
    assert x.shape == (1, INPUT_SIZE, INPUT_SIZE, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(x[0, :, :, 0], x[0, :, :, 2])
    assert x[0, 10, 10, 0] == pytest.approx(prepared[10, 10] / 255.0)


@pytest.mark.parametrize("bad, error", [
    (np.zeros((10, 10), dtype=np.float32), TypeError),
    (np.zeros((1, 10), dtype=np.uint8), ValueError),
    (np.zeros((4, 4, 4, 4), dtype=np.uint8), ValueError),
])
def test_prepare_rejects_what_it_cannot_screen(bad, error):
    with pytest.raises(error):
        prepare(bad)
