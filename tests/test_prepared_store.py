"""Prepared images off the broker: kept in Redis beside the queues (the message names the
instances), prepared again when they are gone; and a worker that serves both queues sends no
second message at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis
from celery import Celery
from pydicom import dcmread

from db.models import InstanceState
from dicom_io.pixels import display_image
from model.artifact import get_model
from model.preprocessing import prepare
from tests.helpers.processes import Process, wait_until
from tests.test_pipeline import _sent_back_rig, _state
from worker.prepared import RedisPreparedStore, key


def test_the_store_gives_back_what_was_put_and_none_for_what_is_gone_or_of_another_side(redis_url):
    client = redis.Redis.from_url(redis_url)
    store = RedisPreparedStore(client, ttl_seconds=120)
    a, b = (np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8) for i in (1, 2))
    store.put([(1, a), (2, b)], version="3")
    assert 0 < client.ttl(key(1, "3", 16)) <= 120
    got = store.get([2, 1, 3], version="3", side=16)
    assert np.array_equal(got[0], b) and np.array_equal(got[1], a) and got[2] is None
    assert store.get([1], version="2", side=16) == [None]  # another version is another image
    client.set(key(4, "3", 16), b"\x00" * 10)  # truncated: not trusted, prepared again
    assert store.get([4], version="3", side=16) == [None]
    store.forget([1, 2], version="3", side=16)
    assert store.get([1, 2], version="3", side=16) == [None, None]
    with pytest.raises(ValueError, match="not a prepared square"):
        store.put([(5, np.zeros((4, 6), np.uint8))], version="3")
    client.close()


def _queued(broker: redis.Redis, queue: str) -> list[tuple[list, dict, int]]:
    """(args, kwargs, size of the message in bytes) of each message waiting in ``queue``."""
    out = []
    for raw in broker.lrange(queue, 0, -1):
        args, kwargs, _ = json.loads(json.loads(raw)["body"])
        out.append((args, kwargs, len(raw)))
    return out


@pytest.mark.slow
def test_the_image_waits_in_redis_and_an_image_gone_is_prepared_again(pg_url, redis_url, processes, tmp_path):
    model = get_model()
    side = model.card.input_size
    with _sent_back_rig(pg_url, redis_url, processes, tmp_path) as (env, sessions, broker, path, instance_id):
        sender = Celery("dispatcher", broker=redis_url)
        sender.send_task("pneumoscreen.preprocess", args=[[instance_id]], queue="preprocess", serializer="json")
        sender.close()
        preprocess = Process(["worker", "--queues", "preprocess"], env, tmp_path / "preprocess.log")
        processes.append(preprocess)
        wait_until(lambda: broker.llen("inference") == 1, timeout=120, what="the inference message")
        [(args, kwargs, size)] = _queued(broker, "inference")
        assert args == [[instance_id], None] and kwargs["stored"] == side
        assert size < 3000  # the names, not the pixels (the image alone is side * side bytes)
        stored = broker.get(key(instance_id, kwargs["preprocessing"], side))
        expected = prepare(display_image(dcmread(path)), side, model.card.preprocessing_version)
        assert stored == expected.tobytes()
        broker.delete(key(instance_id, kwargs["preprocessing"], side))  # expired, evicted, Redis restarted
        # an inference worker whose own choice is "message" still reads what the message says is stored
        inference = Process(["worker", "--queues", "inference"], {**env, "PNEUMOSCREEN_PREPARED_STORE": "message"},
                            tmp_path / "inference.log")
        processes.append(inference)
        wait_until(lambda: _state(sessions)[0] in ("FAILED", "PREDICTED"), timeout=120, what="a final state")
        state, reason = _state(sessions)
        assert state == InstanceState.PREDICTED.value, reason
        assert "no longer in the prepared store; sent back to be prepared again" in inference.log()
        wait_until(lambda: not broker.keys("pneumoscreen:prepared:*"), timeout=30,
                   what="the stored image dropped once its answer was stored")


@pytest.mark.slow
@pytest.mark.parametrize("inline", ["auto", "no"])
def test_a_worker_of_both_queues_scores_what_it_prepared_without_a_second_message(pg_url, redis_url, processes,
                                                                                  tmp_path, inline):
    with _sent_back_rig(pg_url, redis_url, processes, tmp_path) as (env, sessions, broker, path, instance_id):
        env = {**env, "PNEUMOSCREEN_INLINE_INFERENCE": inline}
        sender = Celery("dispatcher", broker=redis_url)
        sender.send_task("pneumoscreen.preprocess", args=[[instance_id]], queue="preprocess", serializer="json")
        sender.close()
        both = Process(["worker", "--queues", "preprocess,inference"], env, tmp_path / "worker.log")
        processes.append(both)
        wait_until(lambda: _state(sessions)[0] in ("FAILED", "PREDICTED"), timeout=120, what="a final state")
        state, reason = _state(sessions)
        assert state == InstanceState.PREDICTED.value, reason
        wait_until(lambda: "pneumoscreen.preprocess" in both.log(), timeout=10, what="the worker's task log")
        received_infer = "Task pneumoscreen.infer[" in both.log()
        assert received_infer is (inline == "no")
