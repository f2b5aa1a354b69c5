"""Micro-batching: concurrent requests share one forward pass; errors reach every caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from model.serving import BatchPredictor


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


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_wait_ms": -1}])
def test_bad_batch_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        BatchPredictor(CountingModel(), **kwargs)
