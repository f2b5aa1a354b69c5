"""The one heatmap of a film (``worker.heatmaps.heatmap_overlay``): the served model's Grad-CAM in
the film's proportions, computed only while no other pass through the network runs."""

from __future__ import annotations

import threading

import numpy as np

from model.artifact import get_model
from model.gradcam import gradcam, overlay
from tests.helpers.dicom_factory import PNEUMONIA_JPEG
from worker.heatmaps import heatmap_overlay
from worker.images import prepare_film


def test_the_overlay_is_the_served_models_grad_cam_in_the_films_proportions():
    model = get_model()
    film, prepared = prepare_film(PNEUMONIA_JPEG, model.card.input_size)
    out = heatmap_overlay(PNEUMONIA_JPEG, model)
    assert out.shape[:2] == film.shape[:2] or max(out.shape[:2]) == 1024
    assert np.array_equal(out, overlay(film, gradcam(model.keras_model, prepared)))


def test_the_overlay_waits_while_the_model_is_in_use():
    model = get_model()
    done = threading.Event()
    with model.lock:  # as an inference batch holds it
        worker = threading.Thread(target=lambda: (heatmap_overlay(PNEUMONIA_JPEG, model), done.set()))
        worker.start()
        assert not done.wait(1.0)
    worker.join(60)
    assert done.is_set()
