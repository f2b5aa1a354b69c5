"""Study assembly and reconciliation: the bridge from the database (the
source of truth) to the broker (only a transport).

- ``dispatch_quiet``: instances of studies that have been quiet for the
  quiet period are marked QUEUED (committed) and then sent to ``preprocess``.
  Instances arriving after their study was dispatched are picked up the same
  way once the study is quiet again.
- ``reconcile``: anything left QUEUED or PREPROCESSED for too long (broker
  restarted, worker killed) is sent again; the tasks are idempotent.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

from kombu.exceptions import KombuError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import InstanceState, utcnow
from db.queries import claim_quiet_instances, stale_instances, touch_instances
from worker.celery_app import INFERENCE_QUEUE, PREPROCESS_QUEUE, app, in_messages, oldest_waiting, sent_now

log = logging.getLogger(__name__)


def _send(ids: list[int]) -> None:
    if not ids:
        return
    with app.producer_or_acquire() as producer:  # one broker producer for the whole round
        for chunk in in_messages(ids):
            app.send_task("pneumoscreen.preprocess", args=[chunk], producer=producer, headers=sent_now())


def dispatch_quiet(sessions: sessionmaker[Session], *, quiet_seconds: float) -> int:
    """Queue the RECEIVED instances of quiet studies; returns how many were sent."""
    with sessions.begin() as session:
        ids = claim_quiet_instances(session, quiet_since=utcnow() - timedelta(seconds=quiet_seconds))
    _send(ids)
    if ids:
        log.info("dispatched %d instance(s) to preprocess", len(ids))
    return len(ids)


#: a message is sent shortly after its row is written: this much earlier than the oldest message still
#: waiting in a queue, a row's message cannot be among those waiting
SEND_SLACK = timedelta(seconds=30)


def reconcile(sessions: sessionmaker[Session], *, older_than_seconds: float) -> int:
    """Send again what has been in flight longer than ``older_than_seconds`` and is not still
    waiting behind a backlog in its queue, and dispatch RECEIVED instances of studies quiet that
    long (in case no listener is dispatching)."""
    sent_before = {}
    for state, queue in ((InstanceState.QUEUED, PREPROCESS_QUEUE), (InstanceState.PREPROCESSED, INFERENCE_QUEUE)):
        oldest = oldest_waiting(queue)
        if oldest is not None:
            sent_before[state] = datetime.fromtimestamp(oldest, timezone.utc) - SEND_SLACK
    with sessions.begin() as session:
        stale = stale_instances(session, older_than=utcnow() - timedelta(seconds=older_than_seconds),
                                sent_before=sent_before)
        ids = [instance_id for instance_id, _ in stale]
        if ids:
            touch_instances(session, ids=ids, state=InstanceState.QUEUED)
    _send(ids)
    if ids:
        log.warning("reconciler re-sent %d instance(s) left in flight", len(ids))
    return len(ids) + dispatch_quiet(sessions, quiet_seconds=older_than_seconds)


class Dispatcher(threading.Thread):
    """Background loop of the listener's process: dispatch quiet studies every ``interval`` seconds.
    Reconciliation is beat's (``pneumoscreen beat``, and the embedded beat of ``pneumoscreen run``)."""

    def __init__(self, sessions: sessionmaker[Session], *, quiet_seconds: float, interval: float = 1.0) -> None:
        super().__init__(name="pneumoscreen-dispatcher", daemon=True)
        self.sessions = sessions
        self.quiet_seconds = quiet_seconds
        self.interval = interval
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                dispatch_quiet(self.sessions, quiet_seconds=self.quiet_seconds)
            except (SQLAlchemyError, KombuError, OSError) as exc:
                # the rows stay as they are; the next round (or the reconciler) picks them up
                log.error("dispatch round failed, will retry: %s", exc)
