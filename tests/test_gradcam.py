"""Grad-CAM heat maps and the overlay a radiologist sees."""

from __future__ import annotations

import cv2
import numpy as np

from model.artifact import get_model
from model.gradcam import OVERLAY_MAX_SIDE, gradcam, overlay
from model.preprocessing import INPUT_SIZE, prepare, read_image_file
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG


def test_the_heat_map_is_normalised_and_differs_between_films():
    model = get_model()
    size = model.card.input_size
    heats = [gradcam(model.keras_model, prepare(read_image_file(p), size)) for p in (PNEUMONIA_JPEG, NORMAL_JPEG)]
    for heat in heats:
        assert heat.shape == (size, size) and heat.min() >= 0 and heat.max() <= 1
    assert heats[0].max() > 0.95  # scaled to 1 at the coarse resolution, then interpolated
    assert np.abs(heats[0] - heats[1]).mean() > 0.01


def test_the_overlay_keeps_the_films_proportions_and_grey_levels():
    film = np.tile(np.linspace(0, 255, 300).astype(np.uint8), (200, 1))
    out = overlay(film, np.zeros((INPUT_SIZE, INPUT_SIZE), np.float32))
    assert out.shape == (200, 300, 3)
    # zero heat is JET's dark blue (BGR 128, 0, 0) at 40%: green carries 60% of the film's own grey
    assert np.abs(out[..., 1].astype(int) - np.rint(0.6 * film).astype(int)).max() <= 1
    hot = overlay(film, np.ones((INPUT_SIZE, INPUT_SIZE), np.float32))
    assert hot[..., 2].astype(int).mean() > out[..., 2].astype(int).mean() + 40


def test_a_large_film_is_scaled_down_in_proportion():
    film = cv2.resize(read_image_file(PNEUMONIA_JPEG), (1500, 3000))
    out = overlay(film, np.zeros((INPUT_SIZE, INPUT_SIZE), np.float32))
    assert out.shape == (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE // 2, 3)
