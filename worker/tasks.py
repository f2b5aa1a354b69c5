"""Celery tasks: thin wrappers that deserialize, call ``worker.pipeline`` and retry.

Transient errors (database or broker unreachable) are retried with backoff;
when the retries are spent, or on any other error, the instance is marked
FAILED with the reason (the dead-letter state, visible in ``pneumoscreen
instances``) and its file is kept. If even that write fails, the instance
stays in flight and the reconciler sends it again later.
"""

from __future__ import annotations

import logging

from celery import Task
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from db.models import InstanceState
from db.queries import set_state
from worker import dispatcher, pipeline, runtime
from worker.celery_app import app

log = logging.getLogger(__name__)

_TRANSIENT = (OperationalError, ConnectionError, TimeoutError)
_RETRY = {"acks_late": True, "autoretry_for": _TRANSIENT, "retry_backoff": True, "retry_backoff_max": 300,
          "max_retries": 10}


class InstanceTask(Task):
    """A task whose first argument is an instance id; a final failure is recorded on the instance."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        instance_id = args[0] if args else kwargs.get("instance_id")
        reason = f"{self.name} gave up after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        try:
            with runtime.sessions().begin() as session:
                set_state(session, instance_id=instance_id, state=InstanceState.FAILED, reason=reason)
            log.error("instance %s FAILED: %s", instance_id, reason)
        except SQLAlchemyError as db_exc:
            log.error("instance %s: %s; could not record it (%s), the reconciler will send it again",
                      instance_id, reason, db_exc)


@app.task(name="pneumoscreen.preprocess", base=InstanceTask, **_RETRY)
def preprocess(instance_id: int) -> None:
    prepared = pipeline.preprocess_instance(runtime.sessions(), instance_id, policy=runtime.eligibility_policy(),
                                            spool=runtime.spool())
    if prepared is not None:
        infer.apply_async(args=[instance_id, pipeline.encode_prepared(prepared)],
                          argsrepr=f"({instance_id}, <prepared image>)")


@app.task(name="pneumoscreen.infer", base=InstanceTask, **_RETRY)
def infer(instance_id: int, prepared: str) -> None:
    model = runtime.load_model()
    probability = runtime.batch_predictor().predict_one(pipeline.decode_prepared(prepared))
    pipeline.record_predictions(runtime.sessions(), model.card, [(instance_id, probability)])


@app.task(name="pneumoscreen.reconcile", acks_late=True, autoretry_for=_TRANSIENT, retry_backoff=True)
def reconcile() -> int:
    return dispatcher.reconcile(runtime.sessions(), older_than_seconds=runtime.settings().reconcile_after_seconds)
