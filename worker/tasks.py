"""Celery tasks: thin wrappers that deserialize, call ``worker.pipeline`` and retry."""

from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError

from model.artifact import get_model
from worker import pipeline, runtime
from worker.celery_app import app

log = logging.getLogger(__name__)

_TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


@app.task(name="pneumoscreen.preprocess", acks_late=True, autoretry_for=_TRANSIENT,
          retry_backoff=True, retry_backoff_max=300, max_retries=10)
def preprocess(instance_id: int) -> None:
    prepared = pipeline.preprocess_instance(runtime.sessions(), instance_id, policy=runtime.eligibility_policy(),
                                            spool=runtime.spool())
    if prepared is not None:
        infer.apply_async(args=[instance_id, pipeline.encode_prepared(prepared)],
                          argsrepr=f"({instance_id}, <prepared image>)")


@app.task(name="pneumoscreen.infer", acks_late=True, autoretry_for=_TRANSIENT,
          retry_backoff=True, retry_backoff_max=300, max_retries=10)
def infer(instance_id: int, prepared: str) -> None:
    model = get_model(runtime.settings().model_dir)
    pipeline.infer(runtime.sessions(), model, [(instance_id, pipeline.decode_prepared(prepared))])


@app.task(name="pneumoscreen.reconcile", acks_late=True, autoretry_for=_TRANSIENT, retry_backoff=True)
def reconcile() -> int:
    from worker.dispatcher import reconcile as reconcile_now

    return reconcile_now(runtime.sessions(), older_than_seconds=runtime.settings().reconcile_after_seconds)
