"""The inference worker's micro-batcher: concurrent requests share one forward pass and one
transaction, each stored before its caller is answered; errors reach only the callers they
concern, and the batcher goes on. The network is a counting stand-in (the batching is under
test); the database is real."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from db.results import list_instances
from tests.helpers.records import model_card, receive
from worker.batching import BatchPredictor


class CountingModel:
    """The LoadedModel interface: probability = the image's first pixel / 255; counts batch sizes."""

    def __init__(self, fail_first: bool = False):
        self.card = model_card("t1")
        self.batch_sizes: list[int] = []
        self.fail_first = fail_first

    def predict(self, batch: np.ndarray) -> list[float]:
        self.batch_sizes.append(len(batch))
        if self.fail_first and len(self.batch_sizes) == 1:
            raise RuntimeError("device lost")
        return [float(image[0, 0]) / 255 for image in batch]


@pytest.fixture
def instance_ids(sessions) -> list[int]:
    with sessions.begin() as s:
        return [receive(s, "1.2.3", f"1.2.3.1.{n}")[0] for n in range(20)]


def _image(value: int) -> np.ndarray:
    return np.full((4, 4), value, dtype=np.uint8)


def _stored(sessions) -> dict[str, float]:
    with sessions() as s:
        return {row["sop_instance_uid"]: row["probability"] for row in list_instances(s)
                if row["probability"] is not None}


def _concurrently(predictor: BatchPredictor, calls: dict[int, int], on_answer=None) -> dict[int, object]:
    """{instance id: image value} asked at once; {instance id: probability or the exception}."""
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(len(calls))

    def call(instance_id: int, value: int) -> None:
        barrier.wait()
        try:
            outcomes[instance_id] = predictor.predict_one(instance_id, _image(value), timeout=30)
            if on_answer is not None:
                on_answer(instance_id)
        except Exception as exc:  # noqa: BLE001  (the test looks at what each caller got)
            outcomes[instance_id] = exc

    threads = [threading.Thread(target=call, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


def test_concurrent_requests_share_batches_and_each_is_stored_before_its_caller_is_answered(
        sessions, instance_ids):
    model = CountingModel()
    predictor = BatchPredictor(sessions, model, max_batch=8, max_wait_ms=500)
    unstored_when_answered: list[int] = []

    def check_stored(instance_id: int) -> None:
        n = instance_ids.index(instance_id)
        if f"1.2.3.1.{n}" not in _stored(sessions):
            unstored_when_answered.append(instance_id)

    outcomes = _concurrently(predictor, {i: n for n, i in enumerate(instance_ids)}, on_answer=check_stored)
    assert outcomes == {i: pytest.approx(n / 255) for n, i in enumerate(instance_ids)}
    assert unstored_when_answered == []
    assert sum(model.batch_sizes) == 20 and max(model.batch_sizes) == 8 and len(model.batch_sizes) <= 5
    assert _stored(sessions) == {f"1.2.3.1.{n}": pytest.approx(n / 255, abs=1e-6) for n in range(20)}


def test_a_lone_request_waits_at_most_the_flush_interval(sessions, instance_ids):
    model = CountingModel()
    predictor = BatchPredictor(sessions, model, max_batch=32, max_wait_ms=10)
    assert predictor.predict_one(instance_ids[0], _image(51), timeout=5) == pytest.approx(0.2)
    assert model.batch_sizes == [1]


def test_a_failing_forward_pass_reaches_its_caller_and_the_batcher_goes_on(sessions, instance_ids):
    predictor = BatchPredictor(sessions, CountingModel(fail_first=True), max_batch=4, max_wait_ms=5)
    with pytest.raises(RuntimeError, match="device lost"):
        predictor.predict_one(instance_ids[0], _image(0), timeout=5)
    assert predictor.predict_one(instance_ids[0], _image(0), timeout=5) == 0.0


def test_an_answer_that_cannot_be_stored_fails_only_its_own_caller(sessions, instance_ids):
    predictor = BatchPredictor(sessions, CountingModel(), max_batch=8, max_wait_ms=500)
    unknown = max(instance_ids) + 1000  # not in the database: its row cannot be written
    calls = {i: 10 + n for n, i in enumerate(instance_ids[:7])} | {unknown: 99}
    outcomes = _concurrently(predictor, calls)
    assert isinstance(outcomes.pop(unknown), IntegrityError)
    assert outcomes == {i: pytest.approx(v / 255) for i, v in calls.items() if i != unknown}
    assert sorted(_stored(sessions)) == sorted(f"1.2.3.1.{n}" for n in range(7))


def test_a_lone_answer_that_cannot_be_stored_reaches_its_caller(sessions, instance_ids):
    predictor = BatchPredictor(sessions, CountingModel(), max_batch=4, max_wait_ms=5)
    with pytest.raises(IntegrityError):
        predictor.predict_one(max(instance_ids) + 1000, _image(1), timeout=5)
    assert predictor.batches == 0


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_wait_ms": -1}])
def test_bad_batch_settings_are_refused(sessions, kwargs):
    with pytest.raises(ValueError):
        BatchPredictor(sessions, CountingModel(), **kwargs)


def test_the_images_of_one_message_are_answered_in_order_and_stored_before_it_returns(sessions, instance_ids):
    model = CountingModel()
    predictor = BatchPredictor(sessions, model, max_batch=32, max_wait_ms=50)
    ids = instance_ids[:8]
    assert predictor.predict_many(ids, [_image(10 * n) for n in range(8)], timeout=30) == \
        pytest.approx([10 * n / 255 for n in range(8)])
    assert model.batch_sizes == [8]  # one message's images share the forward pass
    assert len(_stored(sessions)) == 8
    with pytest.raises(ValueError, match="8 instance ids for 7 images"):
        predictor.predict_many(ids, [_image(0)] * 7)
