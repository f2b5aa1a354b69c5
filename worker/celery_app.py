"""The Celery application and its routing, in one place."""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab

from worker.settings import Settings

PREPROCESS_QUEUE = "preprocess"
INFERENCE_QUEUE = "inference"
MAINTENANCE_QUEUE = "maintenance"
ALL_QUEUES = (PREPROCESS_QUEUE, INFERENCE_QUEUE, MAINTENANCE_QUEUE)

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


def configure_app(settings: Settings) -> Celery:
    """Point the app at the configured broker (Redis in production, memory:// in `run`)."""
    app.conf.broker_url = settings.broker_url
    if settings.broker_url.startswith("redis"):
        # a message not acknowledged within this time is delivered again; bodies are JSON text, so
        # kombu's default base64 layer only makes the 50 KB inference messages a third larger
        # (each message names its encoding: messages queued by an older version still decode)
        app.conf.broker_transport_options = {"visibility_timeout": settings.broker_visibility_timeout,
                                             "body_encoding": "utf-8"}
    app.conf.timezone = settings.timezone
    schedule = {"reconcile": {"task": "pneumoscreen.reconcile", "schedule": settings.reconcile_interval_seconds}}
    if settings.rescreen_schedule:
        hour, minute = settings.rescreen_schedule.split(":")
        schedule["rescreen-archive"] = {"task": "pneumoscreen.rescreen_archive",
                                        "schedule": crontab(hour=int(hour), minute=int(minute))}
    app.conf.beat_schedule = schedule
    return app
