"""Where prepared images wait between the preprocess and the inference workers: never in a broker
message.

A prepared image is a few tens of kilobytes (``side`` x ``side`` uint8). Sent inside a Celery
message it is encoded as text, copied by kombu into the queue, copied again into the ``unacked``
hash while a late-acknowledged message is worked on, and decoded again. Instead, the preprocess
worker stores each image once, as a binary value with a time to live, in the Redis the workers
share (the broker's own server), and the ``infer`` message names only the instances, the
preprocessing version and the side: the key of each image follows from the three.

Nothing depends on an image still being there. An image that is missing (expired, evicted, Redis
restarted) or of another length than the side says is prepared again from the spool (the
inference task sends its instance back to the preprocess queue), never a failure; the reconciler
covers a message that is lost on the way.

When the broker is not Redis, the images travel in the message as before
(``PNEUMOSCREEN_PREPARED_STORE=message``, :func:`worker.pipeline.encode_prepared`).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

#: The prefix of every prepared image's key.
KEY_PREFIX = "pneumoscreen:prepared"


def key(instance_id: int, version: str, side: int) -> str:
    """The key of ``instance_id``'s image prepared at preprocessing ``version``, ``side`` pixels square."""
    return f"{KEY_PREFIX}:{version}:{side}:{instance_id}"


class RedisPreparedStore:
    """Prepared images as binary Redis values with a time to live (seconds)."""

    def __init__(self, client, ttl_seconds: float) -> None:
        self.client = client
        self.ttl = max(1, math.ceil(ttl_seconds))

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float) -> "RedisPreparedStore":
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10), ttl_seconds)

    def put(self, items: list[tuple[int, np.ndarray]], *, version: str) -> None:
        """Store each (instance id, prepared square image), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for instance_id, image in items:
            if image.dtype != np.uint8 or image.ndim != 2 or image.shape[0] != image.shape[1]:
                raise ValueError(f"not a prepared square grey uint8 image: {image.dtype} {image.shape}")
            pipe.set(key(instance_id, version, image.shape[0]), np.ascontiguousarray(image).tobytes(), ex=self.ttl)
        pipe.execute()

    def get(self, instance_ids: list[int], *, version: str, side: int) -> list[np.ndarray | None]:
        """Each instance's image, in order, or None where it is missing or not ``side`` x ``side``."""
        values = self.client.mget([key(i, version, side) for i in instance_ids])
        out: list[np.ndarray | None] = []
        for instance_id, value in zip(instance_ids, values):
            if value is None or len(value) != side * side:
                if value is not None:
                    log.warning("instance %d: its stored prepared image has %d bytes, not %d x %d; prepared again",
                                instance_id, len(value), side, side)
                out.append(None)
            else:
                out.append(np.frombuffer(value, dtype=np.uint8).reshape(side, side))
        return out

    def forget(self, instance_ids: list[int], *, version: str, side: int) -> None:
        """Drop the images of instances whose answers are stored (the time to live would, later)."""
        if instance_ids:
            self.client.delete(*(key(i, version, side) for i in instance_ids))
