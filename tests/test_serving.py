"""The production serving path (the model traced once into a graph that takes uint8 images)
gives the shipped model's own probabilities, at any batch size, and through the batcher."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from db.results import list_instances
from model.artifact import get_model
from model.preprocessing import prepare, read_image_file, to_model_input
from tests.helpers.dicom_factory import FIXTURES
from tests.helpers.records import receive
from worker.batching import BatchPredictor

#: Largest absolute difference in probability allowed between a serving path and keras predict.
PARITY_TOLERANCE = 1e-4


def _fixture_batch(count: int = 32, size: int = 224) -> np.ndarray:
    """``count`` distinct images prepared at ``size``: the four fixture films, then seeded variations of them."""
    films = [read_image_file(p) for p in sorted(FIXTURES.glob("*/*.jpeg"))]
    rng = np.random.default_rng(7)
    out = [prepare(film, size) for film in films]
    while len(out) < count:
        film = films[len(out) % len(films)]
        rows, cols = film.shape
        matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), rng.uniform(-7, 7), rng.uniform(0.92, 1.08))
        image = cv2.warpAffine(film, matrix, (cols, rows), borderMode=cv2.BORDER_REFLECT)
        image = (255.0 * (image / 255.0) ** rng.uniform(0.8, 1.25)).astype(np.uint8)
        out.append(prepare(image[:, ::-1] if rng.random() < 0.5 else image, size))
    return np.stack(out)


@pytest.fixture(scope="module")
def films_and_keras_scores():
    model = get_model()
    films = _fixture_batch(32, model.card.input_size)
    reference = model.keras_model.predict(to_model_input(films), batch_size=32, verbose=0).reshape(-1)
    # Both classes among the films, so a path that mixed images up or mis-scaled them would show.
    assert reference.min() < model.card.threshold < reference.max()
    return model, films, reference


def test_production_forward_pass_on_32_films_matches_keras_predict(films_and_keras_scores):
    model, films, reference = films_and_keras_scores
    scores = np.asarray(model.predict(films))
    assert scores.shape == reference.shape
    assert np.abs(scores - reference).max() <= PARITY_TOLERANCE


@pytest.mark.parametrize("n", [1, 3, 17])
def test_the_traced_forward_pass_matches_keras_predict_at_any_batch_size(films_and_keras_scores, n):
    model, films, reference = films_and_keras_scores
    scores = np.concatenate([model.predict(films[i:i + n]) for i in range(0, len(films), n)])
    assert np.abs(scores - reference).max() <= PARITY_TOLERANCE


def test_concurrent_films_through_the_batcher_match_keras_predict_each_for_its_caller(
        films_and_keras_scores, sessions):
    model, films, reference = films_and_keras_scores
    with sessions.begin() as s:
        ids = [receive(s, "1.2.3", f"1.2.3.1.{n}")[0] for n in range(len(films))]
    predictor = BatchPredictor(sessions, model, max_batch=32, max_wait_ms=500)
    scores = np.full(len(films), np.nan)
    barrier = threading.Barrier(len(films))

    def call(i: int) -> None:
        barrier.wait()
        scores[i] = predictor.predict_one(ids[i], films[i], timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(films))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert predictor.batches < len(films)  # the callers shared forward passes
    assert np.abs(scores - reference).max() <= PARITY_TOLERANCE
    with sessions() as s:
        stored = {row["sop_instance_uid"]: row["probability"] for row in list_instances(s)}
    assert [stored[f"1.2.3.1.{n}"] for n in range(len(films))] == pytest.approx(list(scores), abs=1e-6)
