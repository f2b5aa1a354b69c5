"""Rescreening the archive: instances a model version has not answered yet go
through the pipeline again (the spool keeps every received file).

- ``requeue``: mark them QUEUED (committed) and send them to the workers; the
  nightly beat job and ``pneumoscreen rescreen`` with a shared broker.
- ``screen_here``: the same pipeline functions run in this process, batched;
  ``pneumoscreen rescreen`` when there is no shared broker (the embedded default).
- ``wait``: poll the database until the requeued instances have ended.

Each prediction is stored once per (instance, model version), so running a
rescreen twice, or after an interruption, only does what is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from db.models import utcnow
from db.queries import requeue_for_model
from db.results import open_instance_count, studies_progress
from db.session import IN_CLAUSE_CHUNK
from dicom_io.eligibility import EligibilityPolicy
from dicom_io.spool import Spool
from model.artifact import ModelCard

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class Requeued:
    """What a rescreen put back into the pipeline."""

    model_version: str
    ids: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ids)


def requeue(sessions: sessionmaker[Session], *, model_card: ModelCard, model_dir: str | None,
            since: datetime | None = None, until: datetime | None = None, window_days: int | None = None,
            include_skipped: bool = False, send: bool = True, batch: int = IN_CLAUSE_CHUNK,
            progress: Progress | None = None) -> Requeued:
    """Queue again what ``model_card``'s version has not answered (received in [since, until), or
    in the last ``window_days`` days); with ``include_skipped``, the SKIPPED instances too, to be
    judged again (after ``PNEUMOSCREEN_INTENDED_POPULATION=any``, say).

    With ``send``, each instance goes to the ``preprocess`` queue (with
    ``model_dir`` when it is not the workers' configured model).
    """
    from worker.celery_app import app, in_messages, sent_now

    if window_days is not None:
        since = utcnow() - timedelta(days=window_days)
    done = Requeued(model_card.version)
    skipped_before = utcnow() if include_skipped else None
    while True:
        with sessions.begin() as session:
            ids = requeue_for_model(session, model_version=model_card.version, received_since=since,
                                    received_until=until, limit=batch, skipped_before=skipped_before)
        if not ids:
            break
        done.ids += ids
        if send:
            for chunk in in_messages(ids):
                app.send_task("pneumoscreen.preprocess", args=[chunk], headers=sent_now(),
                              kwargs={"model_dir": model_dir} if model_dir else {})
        if progress is not None:
            progress(len(ids))
    if done.count:
        log.info("rescreen: %d instance(s) queued for model %s", done.count, model_card.version)
    return done


def screen_here(sessions: sessionmaker[Session], ids: list[int], *, model, policy: EligibilityPolicy,
                spool: Spool, batch_size: int = 32, progress: Progress | None = None) -> None:
    """Run the pipeline on ``ids`` in this process, ``batch_size`` images per forward pass."""
    from worker import pipeline

    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        items = []
        for instance_id in chunk:
            prepared = pipeline.preprocess_instance(sessions, instance_id, policy=policy, spool=spool,
                                                    size=model.card.input_size,
                                                    version=model.card.preprocessing_version)
            if prepared is not None:
                items.append((instance_id, prepared))
        pipeline.predict_and_record(sessions, model, items)
        if progress is not None:
            progress(len(chunk))


def open_count(sessions: sessionmaker[Session], ids: list[int]) -> int:
    """How many of ``ids`` have not ended yet."""
    with sessions() as session:
        return open_instance_count(session, instance_ids=ids)


def wait(sessions: sessionmaker[Session], ids: list[int], *, timeout: float,
         progress: Progress | None = None, interval: float = 1.0) -> int:
    """Wait until every one of ``ids`` has ended, or ``timeout`` seconds; returns how many are still open."""
    deadline = time.monotonic() + timeout
    reported = 0
    while True:
        left = open_count(sessions, ids)
        if progress is not None and len(ids) - left > reported:
            progress(len(ids) - left - reported)
            reported = len(ids) - left
        if left == 0 or time.monotonic() >= deadline:
            return left
        time.sleep(interval)


def wait_for_studies(sessions: sessionmaker[Session], study_uids: list[str], *, expected: int, timeout: float,
                     progress: Progress | None = None, interval: float = 1.0) -> int:
    """Wait until ``expected`` instances of these studies have arrived and every one has ended;
    returns how many are still missing or open when the wait stops."""
    deadline = time.monotonic() + timeout
    reported = 0
    while True:
        with sessions() as session:
            arrived, ended = studies_progress(session, study_instance_uids=study_uids)
        if progress is not None and ended > reported:
            progress(ended - reported)
            reported = ended
        left = max(expected, arrived) - ended
        if left <= 0 or time.monotonic() >= deadline:
            return max(left, 0)
        time.sleep(interval)
