"""Celery tasks: thin wrappers that deserialize, call ``worker.pipeline`` (or
``worker.delivery``, ``worker.rescreen``) and retry.

Transient errors (database or broker unreachable) are retried with backoff
(when the broker is down the retry cannot be queued either: the message is
dropped and the reconciler sends the instance again);
when the retries are spent, or on any other error, the instance is marked
FAILED with the reason (the dead-letter state, visible in ``pneumoscreen
instances``) and its file is kept. If even that write fails, the instance
stays in flight and the reconciler sends it again later.
"""

from __future__ import annotations

import logging

from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from db.models import InstanceState
from db.queries import set_state
from model.artifact import read_card
from model.preprocessing import VERSIONS
from worker import delivery, dispatcher, pipeline, rescreen, runtime
from worker.celery_app import app, sent_now

log = logging.getLogger(__name__)

# database, broker or the prepared store (the broker's Redis) unreachable; a retry that cannot even be
# published (broker down) is dropped and the instance, still in flight in the database, is sent again
# by the reconciler
_TRANSIENT = (OperationalError, BrokerError, ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError)
_RETRY = {"acks_late": True, "autoretry_for": _TRANSIENT, "retry_backoff": True, "retry_backoff_max": 300,
          "max_retries": 10}


def _ids(instance_ids: int | list[int]) -> list[int]:
    """A message's instances. Compatibility: a single int (and ``instance_id`` by keyword in
    ``on_failure``) serves the pipeline messages of releases 0.4.0 and earlier, one instance each
    (lists since 0.5.0). Remove, with ``infer``'s single ``prepared`` string, in the first release
    after 0.6.0 whose upgrade notes ask for the queues to be drained."""
    return [instance_ids] if isinstance(instance_ids, int) else list(instance_ids)


class InstanceTask(Task):
    """A task whose first argument names its instances; a final failure is recorded on each."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        reason = f"{self.name} gave up after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        for instance_id in _ids(args[0] if args else kwargs.get("instance_ids", kwargs.get("instance_id"))):
            try:
                with runtime.sessions().begin() as session:
                    set_state(session, instance_id=instance_id, state=InstanceState.FAILED, reason=reason)
                log.error("instance %s FAILED: %s", instance_id, reason)
            except SQLAlchemyError as db_exc:
                log.error("instance %s: %s; could not record it (%s), the reconciler will send it again",
                          instance_id, reason, db_exc)


@app.task(name="pneumoscreen.preprocess", base=InstanceTask, **_RETRY)
def preprocess(instance_ids: int | list[int], model_dir: str | None = None,
               expected_preprocessing: str | None = None, size: int | None = None) -> None:
    """Decode and prepare each instance; those prepared go on together in one ``infer`` message (their
    images in the prepared store, :mod:`worker.prepared`), or straight to this worker's own model when
    it serves the inference queue too (:func:`worker.runtime.infers_here`). ``model_dir`` (a rescreen with another model) travels on to ``infer``; its card's intended
    population decides which films are screened.

    Each film is prepared at the preprocessing version and the side of the model (its card's
    ``preprocessing_version`` and ``input_size``), those of ``model_dir`` or of the configured one.
    ``expected_preprocessing`` and ``size`` come with instances that an inference worker sent back:
    the version and the side its model takes, which the worker prepares at instead of its own
    configured model's (the two differ while another model is being rolled out). A version this
    worker cannot produce fails them with the reason rather than sending them round again.
    """
    ids = _ids(instance_ids)
    version = expected_preprocessing or runtime.preprocessing_version(model_dir)
    if version not in VERSIONS:
        reason = (f"the model expects preprocessing {version}, this preprocess worker prepares "
                  f"{', '.join(VERSIONS)}: upgrade the workers together, then send the study again")
        for instance_id in ids:
            pipeline.finish_instance(runtime.sessions(), instance_id, InstanceState.FAILED, reason,
                                     level=logging.ERROR)
        return
    prepared = pipeline.preprocess_instances(
        runtime.sessions(), ids, policy=runtime.eligibility_policy(model_dir=model_dir), spool=runtime.spool(),
        size=size or runtime.input_size(model_dir), version=version)
    if not prepared:
        return
    sent = [instance_id for instance_id, _ in prepared]
    side = int(prepared[0][1].shape[0])
    if runtime.infers_here() and (version, side) == (runtime.preprocessing_version(model_dir),
                                                      runtime.input_size(model_dir)):
        # this worker's own model takes them as prepared: no second message (a sent-back instance
        # prepared for another worker's model goes on to that model's queue instead)
        _predict_and_deliver(sent, [image for _, image in prepared], model_dir)
        return
    kwargs = {"preprocessing": version, **({"model_dir": model_dir} if model_dir else {})}
    store = runtime.prepared_store()
    if store is not None:  # the images wait in Redis; the message names the instances, version and side
        store.put(prepared, version=version)
        infer.apply_async(args=[sent, None], kwargs={**kwargs, "stored": side},
                          headers=sent_now())
        return
    infer.apply_async(args=[sent, [pipeline.encode_prepared(image) for _, image in prepared]], kwargs=kwargs,
                      argsrepr=f"({sent}, <{len(sent)} prepared images>)", headers=sent_now())


def _predict_and_deliver(ids: list[int], images: list, model_dir: str | None) -> None:
    """One batch's answers stored (through this process's micro-batcher), then its deliveries requested."""
    runtime.batch_predictor(model_dir).predict_many(ids, images)
    version = runtime.load_model(model_dir).card.version
    for delivery_id in delivery.request_deliveries(runtime.sessions(), instance_ids=ids, model_version=version,
                                                   destinations=runtime.destinations()):
        deliver_results.delay(delivery_id)


def _stored_images(ids: list[int], preprocessing: str, side: int) -> list:
    """The images the preprocess worker left in the prepared store, in order (None: missing)."""
    store = runtime.prepared_store(reading=True)
    if store is None:  # a message that names stored images came over a broker that is not Redis
        return [None] * len(ids)
    return store.get(ids, version=preprocessing, side=side)


@app.task(name="pneumoscreen.infer", base=InstanceTask, **_RETRY)
def infer(instance_ids: int | list[int], prepared: str | list[str] | None, model_dir: str | None = None,
          preprocessing: str = "1", stored: int | None = None) -> None:  # "1": messages of 0.3.0 and earlier
    """Batch and predict. ``prepared``: the images, in the message; or None and ``stored``, the side of
    the images the preprocess worker left in the prepared store (:mod:`worker.prepared`). Images
    prepared by another preprocessing version than the model's (a message queued before an
    upgrade), at another size than its input, or no longer in the store, go back to the preprocess
    queue, whose workers read the spool: an inference worker may run on a machine without it."""
    ids = _ids(instance_ids)
    model = runtime.load_model(model_dir)
    card = model.card
    back_kwargs = {"expected_preprocessing": card.preprocessing_version, "size": card.input_size,
                   **({"model_dir": model_dir} if model_dir else {})}
    if preprocessing != card.preprocessing_version:
        log.info("instances %s were prepared with preprocessing %s, the model expects %s; sent back to be "
                 "prepared again", ids, preprocessing, card.preprocessing_version)
        preprocess.apply_async(args=[ids], kwargs=back_kwargs, headers=sent_now())
        return
    if stored is not None:
        decoded = _stored_images(ids, preprocessing, stored)
        why = "no longer in the prepared store"
    else:
        # compatibility, messages of 0.4.0 and earlier (one image as a string): removed with _ids
        decoded = [pipeline.decode_prepared(image) for image in ([prepared] if isinstance(prepared, str) else prepared)]
        why = f"prepared at another size than the {card.input_size} px the model takes"
    fits = [image is not None and image.shape[0] == card.input_size for image in decoded]
    if not all(fits):
        other = [i for i, ok in zip(ids, fits) if not ok]
        log.info("instances %s were %s; sent back to be prepared again", other, why)
        preprocess.apply_async(args=[other], kwargs=back_kwargs, headers=sent_now())
        ids, decoded = [i for i, ok in zip(ids, fits) if ok], [d for d, ok in zip(decoded, fits) if ok]
        if not ids:
            return
    # stored with the rest of their batch before it returns
    _predict_and_deliver(ids, decoded, model_dir)
    store = runtime.prepared_store(reading=True) if stored is not None else None
    if store is not None:
        store.forget(ids, version=preprocessing, side=stored)


@app.task(name="pneumoscreen.deliver_results", bind=True, acks_late=True, autoretry_for=_TRANSIENT,
          retry_backoff=True, retry_backoff_max=600, max_retries=None)
def deliver_results(self, delivery_id: int) -> str:
    """Send one study's result to one destination (any kind); retried with backoff up to
    PNEUMOSCREEN_RESULTS_MAX_RETRIES, then FAILED with the destination's reason."""
    settings = runtime.settings()
    try:
        return delivery.deliver(runtime.sessions(), delivery_id, runtime.delivery_resolver(),
                                claim_seconds=settings.results_claim_seconds)
    except delivery.SendError as exc:
        if self.request.retries >= settings.results_max_retries:
            delivery.give_up(runtime.sessions(), delivery_id, f"gave up after {self.request.retries} retries: {exc}")
            return "failed"
        log.warning("delivery %d: %s; retry %d of %d", delivery_id, exc, self.request.retries + 1,
                    settings.results_max_retries)
        raise self.retry(exc=exc, countdown=min(600, 5 * 2 ** self.request.retries))


@app.task(name="pneumoscreen.reconcile", acks_late=True, autoretry_for=_TRANSIENT, retry_backoff=True)
def reconcile() -> int:
    after = runtime.settings().reconcile_after_seconds
    resent = dispatcher.reconcile(runtime.sessions(), older_than_seconds=after)
    stale = delivery.stale_deliveries(runtime.sessions(), older_than_seconds=after)
    unasked = delivery.unrequested_deliveries(runtime.sessions(), destinations=runtime.destinations(),
                                              older_than_seconds=after)
    for delivery_id in sorted(set(stale) | set(unasked)):
        deliver_results.delay(delivery_id)
    return resent


@app.task(name="pneumoscreen.rescreen_archive", acks_late=True, autoretry_for=_TRANSIENT, retry_backoff=True)
def rescreen_archive() -> int:
    """The nightly job: re-queue what the configured model has not answered yet (a new model version)."""
    settings = runtime.settings()
    return rescreen.requeue(runtime.sessions(), model_dir=None, model_card=read_card(settings.model_dir),
                            window_days=settings.rescreen_window_days or None).count
