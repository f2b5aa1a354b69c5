"""Micro-batching for the inference worker: many messages, one forward pass.

Worker threads each hold one image (one Celery message, acknowledged only
after its own result is stored). They hand the image to the process's
``BatchPredictor`` and wait; a single thread collects up to ``max_batch``
images, or whatever has arrived ``max_wait_ms`` after the first one, and runs
``pipeline.predict_and_record`` on them: one forward pass and one database
transaction for the batch, before any caller is answered. Per-message
acknowledgement (and so exactly-once results) is unchanged, while the model and
the database see batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from model.artifact import LoadedModel
from worker.pipeline import predict_and_record

log = logging.getLogger(__name__)


class BatchPredictor:
    def __init__(self, sessions: sessionmaker[Session], model: LoadedModel, *, max_batch: int = 32,
                 max_wait_ms: float = 20.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.sessions = sessions
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue[tuple[int, np.ndarray, Future]] = queue.Queue()
        self.batches = 0  # forward passes whose answers were stored, for metrics and tests
        self._thread = threading.Thread(target=self._run, name="pneumoscreen-batcher", daemon=True)
        self._thread.start()

    def predict_one(self, instance_id: int, prepared: np.ndarray, timeout: float | None = 300.0) -> float:
        """The probability for one prepared image, computed within a batch and stored before it is returned."""
        [probability] = self.predict_many([instance_id], [prepared], timeout=timeout)
        return probability

    def predict_many(self, instance_ids: list[int], prepared: list[np.ndarray],
                     timeout: float | None = 300.0) -> list[float]:
        """The probabilities for several prepared images (one message's), each computed within a batch
        and all stored before they are returned; the first error of any of them is raised."""
        if len(instance_ids) != len(prepared):
            raise ValueError(f"{len(instance_ids)} instance ids for {len(prepared)} images")
        futures: list[Future] = []
        for instance_id, image in zip(instance_ids, prepared):
            futures.append(Future())
            self._queue.put((instance_id, image, futures[-1]))
        return [future.result(timeout=timeout) for future in futures]

    def _collect(self) -> list[tuple[int, np.ndarray, Future]]:
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
                scores = predict_and_record(self.sessions, self.model, [(key, image) for key, image, _ in items])
            except Exception as exc:  # handed to the callers below, each of whom decides
                if len(items) == 1:
                    items[0][2].set_exception(exc)
                    continue
                log.warning("a batch of %d could not be predicted and stored (%s: %s); one image at a time",
                            len(items), type(exc).__name__, exc)
                self._one_at_a_time(items)
                continue
            self.batches += 1
            for (_, _, future), score in zip(items, scores):
                future.set_result(score)

    def _one_at_a_time(self, items: list[tuple[int, np.ndarray, Future]]) -> None:
        """So that one image whose answer cannot be stored fails only its own caller."""
        for key, image, future in items:
            try:
                [score] = predict_and_record(self.sessions, self.model, [(key, image)])
            except Exception as exc:  # handed to this image's caller
                future.set_exception(exc)
            else:
                self.batches += 1
                future.set_result(score)
