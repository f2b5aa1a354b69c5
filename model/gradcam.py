"""Grad-CAM: where in the film the network looked (Selvaraju et al. 2017)."""

from __future__ import annotations

import cv2
import numpy as np

from model.preprocessing import to_model_input

#: The last convolutional activation of the screening CNN.
DEFAULT_LAYER = "head_relu"

#: Longest side of an overlay; larger films are scaled down to it.
OVERLAY_MAX_SIDE = 1024


def _activation_layers(keras_model, layer: str) -> list:
    """``layer``, or in an ensemble (:func:`model.network.build_ensemble`) every member's copy of it."""
    found = [candidate for candidate in keras_model.layers
             if candidate.name == layer or candidate.name.endswith(f"_{layer}")]
    if not found:
        raise ValueError(f"the model has no layer {layer!r}")
    return found


def gradcam(keras_model, prepared: np.ndarray, *, layer: str = DEFAULT_LAYER) -> np.ndarray:
    """A [0, 1] heat map the size of ``prepared`` (a prepared uint8 image) for the pneumonia output.

    In an ensemble each member's last convolutional activation is weighted by the gradient of the
    ensemble's output, and the members' maps are summed before the ReLU: where the served score looked."""
    import keras
    import tensorflow as tf

    sources = _activation_layers(keras_model, layer)
    grad_model = keras.Model(keras_model.inputs, [[source.output for source in sources], keras_model.output])
    x = tf.convert_to_tensor(to_model_input(prepared))
    with tf.GradientTape() as tape:
        activations, output = grad_model(x, training=False)
        score = output[:, 0]
    grads = tape.gradient(score, activations)
    total = sum(tf.reduce_sum(a * tf.reduce_mean(g, axis=(1, 2))[:, None, None, :], axis=-1)
                for a, g in zip(activations, grads))
    cam = tf.nn.relu(total)[0].numpy()
    if cam.max() > 0:
        cam = cam / cam.max()
    return cv2.resize(cam.astype(np.float32), prepared.shape[::-1], interpolation=cv2.INTER_LINEAR)


def overlay(film: np.ndarray, heat: np.ndarray, *, alpha: float = 0.4,
            max_side: int = OVERLAY_MAX_SIDE, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The film as displayed (2-D ``uint8``, any size) with the heat map in the JET
    colour map on top (BGR uint8).

    The heat map, computed on the square prepared image, is stretched back onto ``box``
    (``(top, left, height, width)`` in the film's pixels: the region the preprocessing resized to
    that square, :func:`model.preprocessing.crop_box`; default the whole film) and is zero outside
    it; the film keeps its grey levels (not the equalized ones the network saw) and is scaled down
    to ``max_side`` at most.
    """
    top, left, height, width = box or (0, 0, film.shape[0], film.shape[1])
    scale = min(1.0, max_side / max(film.shape))
    if scale < 1.0:
        film = cv2.resize(film, (max(1, round(film.shape[1] * scale)), max(1, round(film.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
        top, left = round(top * scale), round(left * scale)
        height = max(1, min(film.shape[0] - top, round(height * scale)))
        width = max(1, min(film.shape[1] - left, round(width * scale)))
    full = np.zeros(film.shape, dtype=np.float32)
    full[top:top + height, left:left + width] = cv2.resize(np.clip(heat, 0, 1).astype(np.float32), (width, height),
                                                           interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(full * 255), cv2.COLORMAP_JET)
    grey = cv2.cvtColor(np.ascontiguousarray(film, dtype=np.uint8), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(colour, alpha, grey, 1 - alpha, 0)
