"""The model artifact: a folder with ``model.keras`` and ``model_card.json``.

The card names the exact model (name, version, sha256 of the weights file),
its decision threshold, the input size and preprocessing version it expects,
the data it was trained on and its validation figures. The shipped default
lives in ``model/default/`` so a fresh install screens with no download.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from model.preprocessing import PREPROCESSING_VERSION, VERSIONS, prepared_batch

WEIGHTS_FILE = "model.keras"
CARD_FILE = "model_card.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def flagged_at(scores, threshold: float):
    """The one flag rule, on one probability or an array of them: at or above ``threshold`` is
    flagged. ``ModelCard.flags`` and the choice and measurement of thresholds (``model.metrics``,
    ``model.operating_point``) all compare through this."""
    return scores >= threshold


def study_flagged(image_flags: Iterable[bool]) -> bool:
    """The study-level flag rule: a study is flagged when any of its images is. Its SQL form, for
    queries that group images by study, is ``db.results.any_image_flagged`` (db/ imports nothing
    from model/)."""
    return any(bool(flag) for flag in image_flags)


@dataclass(frozen=True)
class ModelCard:
    """What a result must name about the model that produced it."""

    name: str
    version: str
    sha256: str
    threshold: float
    input_size: int
    preprocessing_version: str
    training_data: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: who the model was trained on: ``description``, ``age_years`` {"min", "max"} (completed years,
    #: both inclusive), ``views``, ``source``; empty for a card that does not say (no age gate)
    intended_population: dict[str, Any] = field(default_factory=dict)
    #: set by ``pneumoscreen calibrate``: the site sample and the figures on it
    site_calibration: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def flags(self, probability: float) -> bool:
        """The one flag rule: a probability at or above the card's threshold is flagged."""
        return bool(flagged_at(probability, self.threshold))

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
        if len(self.sha256) != 64:
            raise ValueError("sha256 must be a 64-character hex digest of the weights file")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelCard":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


class ModelArtifactError(RuntimeError):
    """The model folder is missing, incomplete or does not match its card."""


def read_card(model_dir: str | Path | None = None, *, verify: bool = True) -> ModelCard:
    """Read (and by default verify against the weights file) a model card."""
    model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    card_path, weights_path = model_dir / CARD_FILE, model_dir / WEIGHTS_FILE
    if not card_path.is_file() or not weights_path.is_file():
        raise ModelArtifactError(f"{model_dir}: expected {WEIGHTS_FILE} and {CARD_FILE}")
    card = ModelCard.from_file(card_path)
    if card.preprocessing_version not in VERSIONS:
        raise ModelArtifactError(
            f"{model_dir}: model expects preprocessing version {card.preprocessing_version}, "
            f"this installation prepares {', '.join(VERSIONS)}"
        )
    if verify and sha256_file(weights_path) != card.sha256:
        raise ModelArtifactError(f"{weights_path}: sha256 does not match {CARD_FILE}")
    return card


def save_artifact(model, out_dir: str | Path, **card_fields: Any) -> ModelCard:
    """Write ``model`` and its card into ``out_dir``; the sha256 is computed here. The card's
    ``preprocessing_version`` defaults to :data:`PREPROCESSING_VERSION`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS_FILE
    model.save(weights_path)
    card = ModelCard(sha256=sha256_file(weights_path),
                     **{"preprocessing_version": PREPROCESSING_VERSION, **card_fields})
    card.write(out_dir / CARD_FILE)
    return card


def configure_tensorflow(*, intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
    """Set TensorFlow's thread pools (0 = its default) and turn GPU memory growth on.

    Must run before TensorFlow executes anything in this process; later calls are ignored
    with a warning by TensorFlow itself.
    """
    import tensorflow as tf

    try:
        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # TensorFlow already initialised in this process
        import logging

        logging.getLogger(__name__).warning("TensorFlow already running, settings not applied: %s", exc)


class LoadedModel:
    """A Keras model with its card, ready for batched inference."""

    def __init__(self, model_dir: str | Path | None = None) -> None:
        import keras  # deferred: TensorFlow takes seconds to import

        self.model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        self.card = read_card(self.model_dir)
        self.keras_model = keras.models.load_model(self.model_dir / WEIGHTS_FILE, compile=False)
        self.lock = threading.Lock()
        """Held by every pass through the network in this process (inference, Grad-CAM)."""
        self._forward = self._traced_forward()

    def _traced_forward(self):
        """The forward pass traced once into a graph for any batch size.

        Calling the Keras model eagerly costs about 50 ms more per call (67 ms
        for one image against 14 ms traced; 12 against 9 ms per image at batch
        32, on two cores); a worker that sees small batches would pay it on most images.
        The graph takes the prepared ``uint8`` images and does ``to_model_input``'s
        scaling and channel copy itself (the same float32 arithmetic), so a quarter
        of the bytes cross into TensorFlow: 3.1 against 4.1 ms per image at batch 8.
        """
        import tensorflow as tf

        size = self.card.input_size
        model = self.keras_model

        def forward(prepared):
            grey = tf.cast(prepared, tf.float32) / 255.0
            return model(tf.repeat(tf.expand_dims(grey, -1), 3, axis=-1), training=False)

        return tf.function(forward, autograph=False, input_signature=[tf.TensorSpec([None, size, size], tf.uint8)])

    def predict(self, prepared) -> "list[float]":
        """Probabilities for a batch of prepared ``uint8`` images ``(n, size, size)``.

        One forward pass for the whole batch (never one call per image).
        """
        import numpy as np

        x = prepared_batch(prepared)
        if x.shape[1:] != (self.card.input_size, self.card.input_size):
            raise ValueError(f"model expects {self.card.input_size}px input, got {x.shape[1]}px")
        with self.lock:
            out = self._forward(x)
        return [float(p) for p in np.asarray(out).reshape(-1)]


_cache: dict[Path, LoadedModel] = {}
_cache_lock = threading.Lock()


def get_model(model_dir: str | Path | None = None) -> LoadedModel:
    """The process-wide model for ``model_dir``, loaded once on first use."""
    key = (Path(model_dir) if model_dir else DEFAULT_MODEL_DIR).resolve()
    with _cache_lock:
        if key not in _cache:
            _cache[key] = LoadedModel(key)
        return _cache[key]
