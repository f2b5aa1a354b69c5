"""The one Grad-CAM heatmap of a film: prepared at the model card's input size and preprocessing
version, explained under the model's lock (one pass through the network at a time in a process,
inference included), drawn over the film as displayed, on the region the preprocessing kept. Used
by the study pages, ``pneumoscreen predict --heatmap`` and the heatmaps sent with a report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset

from worker.images import prepare_film

if TYPE_CHECKING:
    from model.artifact import LoadedModel


def heatmap_overlay(source: Path | Dataset, model: LoadedModel) -> np.ndarray:
    """The Grad-CAM overlay of ``model`` on the film ``source`` (a DICOM file or dataset, or a
    PNG/JPEG file): BGR ``uint8`` in the film's own proportions, at most
    ``model.gradcam.OVERLAY_MAX_SIDE`` on its longest side. ``UnreadableInput`` says why not."""
    from model.gradcam import gradcam, overlay
    from model.preprocessing import crop_box

    version = model.card.preprocessing_version
    film, prepared = prepare_film(source, model.card.input_size, version)
    with model.lock:
        heat = gradcam(model.keras_model, prepared)
    return overlay(film, heat, box=crop_box(film, version))
