"""Micro-batching: concurrent requests share one forward pass; errors reach every caller;
the production serving path gives the shipped model's own probabilities."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from dicom_factory import FIXTURES
from model.artifact import get_model
from model.preprocessing import prepare, read_image_file, to_model_input
from model.serving import BatchPredictor

#: Largest absolute difference in probability allowed between a serving path and keras predict.
PARITY_TOLERANCE = 1e-4


class CountingModel:
    def __init__(self):
        self.batch_sizes = []

    def __call__(self, batch: np.ndarray) -> list[float]:
        self.batch_sizes.append(len(batch))
        return [float(image[0, 0]) / 255 for image in batch]


def _concurrently(predictor: BatchPredictor, values: list[int]) -> dict[int, float]:
    results: dict[int, float] = {}
    barrier = threading.Barrier(len(values))

    def call(v: int) -> None:
        barrier.wait()
        results[v] = predictor.predict_one(np.full((4, 4), v, dtype=np.uint8))

    threads = [threading.Thread(target=call, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_concurrent_requests_are_answered_from_shared_batches_each_with_its_own_result():
    model = CountingModel()
    predictor = BatchPredictor(model, max_batch=8, max_wait_ms=500)
    results = _concurrently(predictor, list(range(20)))
    assert results == {v: pytest.approx(v / 255) for v in range(20)}
    assert sum(model.batch_sizes) == 20
    assert max(model.batch_sizes) == 8 and len(model.batch_sizes) <= 5


def test_a_lone_request_waits_at_most_the_flush_interval():
    model = CountingModel()
    predictor = BatchPredictor(model, max_batch=32, max_wait_ms=10)
    assert predictor.predict_one(np.full((4, 4), 51, dtype=np.uint8), timeout=5) == pytest.approx(0.2)
    assert model.batch_sizes == [1]


def test_a_failing_forward_pass_reaches_every_caller_and_the_batcher_goes_on():
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [0.5] * len(batch)

    predictor = BatchPredictor(flaky, max_batch=4, max_wait_ms=5)
    with pytest.raises(RuntimeError, match="device lost"):
        predictor.predict_one(np.zeros((4, 4), dtype=np.uint8), timeout=5)
    assert predictor.predict_one(np.zeros((4, 4), dtype=np.uint8), timeout=5) == 0.5


def test_each_batch_is_recorded_once_under_its_callers_keys_before_any_caller_is_answered():
    recorded: list[list[tuple[int, float]]] = []
    answered_before_record: list[int] = []
    results: dict[int, float] = {}

    def record(batch_results):
        answered_before_record.extend(k for k, _ in batch_results if k in results)
        recorded.append(list(batch_results))

    predictor = BatchPredictor(CountingModel(), max_batch=8, max_wait_ms=500, record=record)
    barrier = threading.Barrier(20)

    def call(v: int) -> None:
        barrier.wait()
        results[v] = predictor.predict_one(np.full((4, 4), v, dtype=np.uint8), key=v)

    threads = [threading.Thread(target=call, args=(v,)) for v in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(k for batch in recorded for k, _ in batch) == list(range(20))
    assert all(p == pytest.approx(k / 255) for batch in recorded for k, p in batch)
    assert len(recorded) <= 5 and answered_before_record == []
    assert results == {v: pytest.approx(v / 255) for v in range(20)}


def test_a_failing_record_reaches_the_caller_who_is_not_answered():
    def record(_):
        raise ConnectionError("database gone")

    predictor = BatchPredictor(CountingModel(), max_batch=4, max_wait_ms=5, record=record)
    with pytest.raises(ConnectionError, match="database gone"):
        predictor.predict_one(np.zeros((4, 4), dtype=np.uint8), key=1, timeout=5)
    assert predictor.batches == 0


def test_a_result_that_cannot_be_stored_fails_only_its_own_caller():
    stored: list[int] = []

    def record(batch_results):
        if any(key == 13 for key, _ in batch_results):
            raise ValueError("instance 13 is not in the database")
        stored.extend(key for key, _ in batch_results)

    predictor = BatchPredictor(CountingModel(), max_batch=8, max_wait_ms=500, record=record)
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(8)

    def call(v: int) -> None:
        barrier.wait()
        try:
            outcomes[v] = predictor.predict_one(np.full((4, 4), v, dtype=np.uint8), key=v, timeout=30)
        except ValueError as exc:
            outcomes[v] = exc

    threads = [threading.Thread(target=call, args=(v,)) for v in range(10, 18)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(outcomes.pop(13), ValueError)
    assert outcomes == {v: pytest.approx(v / 255) for v in range(10, 18) if v != 13}
    assert sorted(stored) == [v for v in range(10, 18) if v != 13]


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_wait_ms": -1}])
def test_bad_batch_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        BatchPredictor(CountingModel(), **kwargs)


def _fixture_batch(count: int = 32) -> np.ndarray:
    """``count`` distinct prepared images: the four fixture films, then seeded variations of them."""
    films = [read_image_file(p) for p in sorted(FIXTURES.glob("*/*.jpeg"))]
    rng = np.random.default_rng(7)
    out = [prepare(film) for film in films]
    while len(out) < count:
        film = films[len(out) % len(films)]
        rows, cols = film.shape
        matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), rng.uniform(-7, 7), rng.uniform(0.92, 1.08))
        image = cv2.warpAffine(film, matrix, (cols, rows), borderMode=cv2.BORDER_REFLECT)
        image = (255.0 * (image / 255.0) ** rng.uniform(0.8, 1.25)).astype(np.uint8)
        out.append(prepare(image[:, ::-1] if rng.random() < 0.5 else image))
    return np.stack(out)


@pytest.fixture(scope="module")
def films_and_keras_scores():
    model = get_model()
    films = _fixture_batch(32)
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


def test_concurrent_films_through_the_batcher_match_keras_predict_each_for_its_caller(films_and_keras_scores):
    model, films, reference = films_and_keras_scores
    predictor = BatchPredictor(model.predict, max_batch=32, max_wait_ms=500)
    scores = np.full(len(films), np.nan)
    barrier = threading.Barrier(len(films))

    def call(i: int) -> None:
        barrier.wait()
        scores[i] = predictor.predict_one(films[i], timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(films))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert predictor.batches < len(films)  # the callers shared forward passes
    assert np.abs(scores - reference).max() <= PARITY_TOLERANCE
