"""The reconciler sends again what was lost, and only that: an instance whose message still
waits behind a backlog in its queue is left alone (re-sending it would only add to the backlog,
and under a long one the duplicates would outnumber the work). Real Redis and both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from sqlalchemy import update

from db.models import Instance, InstanceState, utcnow
from db.queries import claim_quiet_instances
from tests.helpers.records import receive
from worker import dispatcher
from worker.celery_app import PREPROCESS_QUEUE, app, configure_app, in_messages, oldest_waiting, sent_now
from worker.settings import Settings


@pytest.fixture
def database_url(any_database_url):
    return any_database_url


@pytest.fixture
def broker(redis_url):
    app.close()
    configure_app(Settings(_env_file=None, broker_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _queue_study(sessions, n: int, *, study: str = "1.2.3") -> list[int]:
    with sessions.begin() as s:
        for i in range(n):
            receive(s, study, f"{study}.{i}")
    return _dispatch(sessions)


def _dispatch(sessions) -> list[int]:
    with sessions.begin() as s:
        ids = claim_quiet_instances(s, quiet_since=utcnow() + timedelta(seconds=1))
    dispatcher._send(ids)
    return ids


def _age(sessions, ids: list[int], minutes: float) -> None:
    """As if the rows had been written ``minutes`` ago (their messages keep their send time)."""
    with sessions.begin() as s:
        s.execute(update(Instance).where(Instance.id.in_(ids)).values(updated_at=utcnow() - timedelta(minutes=minutes)))


def test_instances_whose_messages_still_wait_in_the_queue_are_not_sent_again(sessions, broker):
    ids = _queue_study(sessions, 20)
    messages = len(in_messages(ids))
    assert broker.llen(PREPROCESS_QUEUE) == messages and oldest_waiting(PREPROCESS_QUEUE) is not None
    # in flight longer than the reconciler waits, but their messages were sent no earlier than the
    # oldest one still waiting: a backlog, not a loss
    assert dispatcher.reconcile(sessions, older_than_seconds=0) == 0
    assert broker.llen(PREPROCESS_QUEUE) == messages
    # a later round behind the same backlog: the rows of these messages were written just before them
    _age(sessions, ids, minutes=0.25)
    assert dispatcher.reconcile(sessions, older_than_seconds=0) == 0
    assert broker.llen(PREPROCESS_QUEUE) == messages


def test_lost_messages_are_sent_again_even_behind_a_backlog_of_newer_ones(sessions, broker):
    lost = _queue_study(sessions, 5, study="1.2.3")
    broker.delete(PREPROCESS_QUEUE)  # a broker restart without persistence
    _age(sessions, lost, minutes=10)
    newer = _queue_study(sessions, 7, study="1.2.4")  # new work sent after the restart, still waiting
    assert dispatcher.reconcile(sessions, older_than_seconds=60) == len(lost)
    assert broker.llen(PREPROCESS_QUEUE) == len(in_messages(newer)) + len(in_messages(lost))
    with sessions() as s:
        assert {s.get(Instance, i).state for i in lost} == {InstanceState.QUEUED}


def test_with_an_empty_queue_everything_in_flight_long_enough_is_sent_again(sessions, broker):
    ids = _queue_study(sessions, 4)
    broker.delete(PREPROCESS_QUEUE)
    assert oldest_waiting(PREPROCESS_QUEUE) is None
    assert dispatcher.reconcile(sessions, older_than_seconds=60) == 0  # not long enough yet
    _age(sessions, ids, minutes=2)
    assert dispatcher.reconcile(sessions, older_than_seconds=60) == 4
    assert broker.llen(PREPROCESS_QUEUE) == 1  # one message for the four


def test_the_in_process_broker_of_pneumoscreen_run_tells_its_oldest_message_too(sessions):
    before = app.conf.broker_url
    configure_app(Settings(_env_file=None, broker_url="memory://localhost/"))
    try:
        with sessions.begin() as s:
            for i in range(3):
                receive(s, "1.2.5", f"1.2.5.{i}")
            ids = claim_quiet_instances(s, quiet_since=utcnow() + timedelta(seconds=1))
        with app.connection_for_write() as connection:  # this broker's, not a pooled one of an earlier test
            app.send_task("pneumoscreen.preprocess", args=[ids], connection=connection, headers=sent_now())
        assert oldest_waiting(PREPROCESS_QUEUE) is not None
        assert dispatcher.reconcile(sessions, older_than_seconds=0) == 0
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queues.pop(PREPROCESS_QUEUE, None)
        app.conf.broker_url = before


def test_reports_a_dead_worker_never_asked_for_are_asked_for_once(sessions):
    """A worker killed between recording a batch's answers and asking for the study's report."""
    from db.deliveries import delivery_counts
    from tests.helpers.records import answer
    from worker import delivery
    from worker.settings import Settings

    with sessions.begin() as s:
        old = [receive(s, "1.5", f"1.5.{i}")[0] for i in range(2)]
        recent, _ = receive(s, "1.6", "1.6.0")
        answer(s, [(old[0], 0.9), (old[1], 0.1), (recent, 0.4)])
    _age(sessions, old, minutes=10)
    pacs = [delivery.destination_for("dicom", "PACS@pacs:104", Settings())]
    asked = delivery.unrequested_deliveries(sessions, destinations=pacs, older_than_seconds=60)
    assert len(asked) == 1, "study 1.6 was answered a moment ago: its worker may still be asking"
    assert delivery.unrequested_deliveries(sessions, destinations=pacs, older_than_seconds=60) == []
    with sessions.begin() as s:
        assert delivery_counts(s) == {"PENDING": 1}
