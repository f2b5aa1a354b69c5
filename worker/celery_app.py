"""The Celery application and its routing, in one place."""

from __future__ import annotations

import json
import logging
import time

from celery import Celery
from celery.schedules import crontab

from worker.settings import Settings

PREPROCESS_QUEUE = "preprocess"
INFERENCE_QUEUE = "inference"
MAINTENANCE_QUEUE = "maintenance"
ALL_QUEUES = (PREPROCESS_QUEUE, INFERENCE_QUEUE, MAINTENANCE_QUEUE)
SENT_AT = "pneumoscreen_sent_at"
"""Message header: when the message was sent (seconds since the epoch), after its instance's row was
written; the reconciler compares it with the rows' ``updated_at`` to tell a message that is still
waiting in its queue from a lost one."""

log = logging.getLogger(__name__)

MEMORY_POLLING_SECONDS = 0.005
IMAGES_PER_MESSAGE = 8
"""Instances per pipeline message (preprocess, then inference): the broker, the task machinery and
the acknowledgement are paid once per message, the decoding and the forward pass once per image.
An acknowledgement still means that every answer of the message is stored."""


def in_messages(ids: list[int], size: int = IMAGES_PER_MESSAGE) -> list[list[int]]:
    """``ids`` in the order given (a study's instances stay together), ``size`` to a message."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]

app = Celery("pneumoscreen", include=["worker.tasks"])
app.conf.update(
    task_routes={
        "pneumoscreen.preprocess": {"queue": PREPROCESS_QUEUE},
        "pneumoscreen.infer": {"queue": INFERENCE_QUEUE},
        "pneumoscreen.reconcile": {"queue": MAINTENANCE_QUEUE},
        "pneumoscreen.deliver_results": {"queue": MAINTENANCE_QUEUE},
        "pneumoscreen.rescreen_archive": {"queue": MAINTENANCE_QUEUE},
    },
    task_default_queue=PREPROCESS_QUEUE,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def sent_now() -> dict[str, float]:
    """The headers of a pipeline message sent now."""
    return {SENT_AT: time.time()}


def oldest_waiting(queue: str) -> float | None:
    """When the message that has waited longest in ``queue`` was sent (seconds since the epoch);
    None when the queue is empty, the message carries no time, or the broker cannot say (it is
    neither Redis nor the in-process broker, or it is unreachable)."""
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            if connection.transport.driver_type == "memory":
                waiting = channel.queues.get(queue)
                message = waiting.queue[0] if waiting is not None and waiting.queue else None
            elif connection.transport.driver_type == "redis":
                raw = channel.client.lindex(queue, -1)  # kombu pushes on the left and takes from the right
                message = json.loads(raw) if raw else None
            else:
                return None
    except Exception as exc:  # noqa: BLE001 - an unreadable queue leaves the reconciler as it was
        log.warning("could not look at the %s queue: %s: %s", queue, type(exc).__name__, exc)
        return None
    sent_at = (message or {}).get("headers", {}).get(SENT_AT)
    return float(sent_at) if isinstance(sent_at, (int, float)) else None


def configure_app(settings: Settings) -> Celery:
    """Point the app at the configured broker (Redis in production, memory:// in `run`)."""
    app.conf.broker_url = settings.broker_url
    if settings.broker_url.startswith("redis"):
        # a message not acknowledged within this time is delivered again; bodies are JSON text, so
        # kombu's default base64 layer only makes the 50 KB inference messages a third larger
        # (each message names its encoding: kombu still decodes the base64 bodies of messages queued by
        # releases 0.2.0 and earlier; nothing of ours to remove, kombu reads the encoding per message)
        app.conf.broker_transport_options = {"visibility_timeout": settings.broker_visibility_timeout,
                                             "body_encoding": "utf-8"}
    elif settings.broker_url.startswith("memory"):
        # `run`'s in-process broker is polled: when every worker thread holds a message (the
        # prefetch limit), kombu sleeps the polling interval before it looks again, 1 s by default,
        # which left the threads idle most of the time
        app.conf.broker_transport_options = {"polling_interval": MEMORY_POLLING_SECONDS}
    app.conf.timezone = settings.timezone
    schedule = {"reconcile": {"task": "pneumoscreen.reconcile", "schedule": settings.reconcile_interval_seconds}}
    if settings.rescreen_schedule:
        hour, minute = settings.rescreen_schedule.split(":")
        schedule["rescreen-archive"] = {"task": "pneumoscreen.rescreen_archive",
                                        "schedule": crontab(hour=int(hour), minute=int(minute))}
    app.conf.beat_schedule = schedule
    return app
