"""Micro-batching for inference: many callers, one forward pass.

Worker threads each hold one image (one Celery message, acknowledged only
after its own result is stored). They hand the image to a ``BatchPredictor``
and wait; a single thread collects up to ``max_batch`` images, or whatever
has arrived ``max_wait_ms`` after the first one, and runs one batched
forward pass for all of them. With ``record``, that thread also stores the
batch's results (one database transaction instead of one per image) before
any caller is answered. Per-message acknowledgement (and so exactly-once
results) is unchanged, while the model and the database see batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable

import numpy as np

log = logging.getLogger(__name__)


class BatchPredictor:
    def __init__(self, predict: Callable[[np.ndarray], list[float]], *, max_batch: int = 32,
                 max_wait_ms: float = 20.0,
                 record: Callable[[list[tuple[Hashable, float]]], Any] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._predict = predict
        self._record = record
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue[tuple[np.ndarray, Hashable, Future]] = queue.Queue()
        self.batches = 0  # forward passes run, for metrics and tests
        self._thread = threading.Thread(target=self._run, name="pneumoscreen-batcher", daemon=True)
        self._thread.start()

    def predict_one(self, prepared: np.ndarray, key: Hashable = None, timeout: float | None = 300.0) -> float:
        """The probability for one prepared image, computed within a batch (and
        recorded under ``key`` by ``record`` before it is returned)."""
        future: Future = Future()
        self._queue.put((prepared, key, future))
        return future.result(timeout=timeout)

    def _collect(self) -> list[tuple[np.ndarray, Hashable, Future]]:
        items = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return items

    def _run(self) -> None:
        while True:
            items = self._collect()
            try:
                scores = self._predict(np.stack([image for image, _, _ in items]))
            except Exception as exc:  # handed to every waiting caller, who decides
                for _, _, future in items:
                    future.set_exception(exc)
                continue
            errors = self._store([key for _, key, _ in items], scores)
            if len(errors) < len(items):
                self.batches += 1
            for index, ((_, _, future), score) in enumerate(zip(items, scores)):
                if index in errors:
                    future.set_exception(errors[index])
                else:
                    future.set_result(score)

    def _store(self, keys: list[Hashable], scores: list[float]) -> dict[int, Exception]:
        """Record the batch in one call; if that fails, each result on its own, so that
        one result that cannot be stored fails only its own caller. Returns the failures by index."""
        if self._record is None:
            return {}
        try:
            self._record(list(zip(keys, scores)))
            return {}
        except Exception as exc:
            if len(keys) == 1:
                return {0: exc}
        errors: dict[int, Exception] = {}
        for index, (key, score) in enumerate(zip(keys, scores)):
            try:
                self._record([(key, score)])
            except Exception as exc:
                errors[index] = exc
        return errors
