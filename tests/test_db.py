"""Schema and queries on both SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import inspect, text

from db.migrate import is_current, upgrade
from db.models import InstanceState, utcnow
from db.queries import claim_quiet_instances, requeue_for_model, set_state, stale_instances, touch_instances
from db.results import (
    PRIORITY_FLAGGED,
    PRIORITY_PENDING,
    PRIORITY_ROUTINE,
    list_instances,
    rescreen_changes,
    study_detail,
    worklist,
)
from db.session import make_engine, make_sessionmaker
from tests.helpers.records import answer, fill_answered_day, model_card, receive


@pytest.fixture
def database_url(any_database_url):
    return any_database_url


def test_migration_creates_the_tables(sessions, database_url):
    assert is_current(database_url)
    with sessions() as s:
        names = set(inspect(s.get_bind()).get_table_names())
    assert {"study", "series", "instance", "prediction", "model_version", "result_delivery", "audit_log",
            "alembic_version"} <= names


def test_the_migrations_make_the_schema_the_models_describe(sessions):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base

    with sessions() as s:
        context = MigrationContext.configure(s.connection(), opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_record_received_is_idempotent_per_sop_instance(sessions):
    with sessions.begin() as s:
        first, created = receive(s, "1.2.3", "1.2.3.1.1")
        assert created
    with sessions.begin() as s:
        again, created = receive(s, "1.2.3", "1.2.3.1.1")
        assert not created and again == first
    with sessions() as s:
        assert len(list_instances(s)) == 1


def test_quiet_studies_are_claimed_once(sessions):
    with sessions.begin() as s:
        receive(s, "1.2.3", "1.2.3.1.1")
        receive(s, "1.2.3", "1.2.3.1.2")
    with sessions.begin() as s:
        assert claim_quiet_instances(s, quiet_since=utcnow().replace(year=2000)) == []
    with sessions.begin() as s:
        assert len(claim_quiet_instances(s, quiet_since=utcnow())) == 2
    with sessions.begin() as s:
        assert claim_quiet_instances(s, quiet_since=utcnow()) == []
        assert {r["state"] for r in list_instances(s)} == {"QUEUED"}


def test_concurrent_rounds_do_not_claim_or_resend_the_same_instances(pg_url):
    """The listener's dispatcher and the reconcilers run at once: what one round holds, the other skips."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as s:
            receive(s, "1.2.9", "1.2.9.1.1")
            receive(s, "1.2.9", "1.2.9.1.2")
        with sessions.begin() as first, sessions.begin() as second:
            second.execute(text("SET LOCAL lock_timeout = '2s'"))  # waiting on the first would be a failure
            assert len(claim_quiet_instances(first, quiet_since=utcnow())) == 2
            assert claim_quiet_instances(second, quiet_since=utcnow()) == []
        with sessions.begin() as first, sessions.begin() as second:
            second.execute(text("SET LOCAL lock_timeout = '2s'"))
            stale = stale_instances(first, older_than=utcnow())
            assert [state for _, state in stale] == [InstanceState.QUEUED] * 2
            touch_instances(first, ids=[i for i, _ in stale], state=InstanceState.QUEUED)
            assert stale_instances(second, older_than=utcnow()) == []
        with sessions.begin() as s:  # once the first round has committed, the rows are fresh
            assert stale_instances(s, older_than=utcnow().replace(year=2000)) == []
    finally:
        engine.dispose()


def test_prediction_is_recorded_once_per_model_version(sessions):
    with sessions.begin() as s:
        instance, _ = receive(s, "1.2.3", "1.2.3.1.1")
        answer(s, [(instance, 0.8)])
    with sessions.begin() as s:
        answer(s, [(instance, 0.1)])  # a redelivered message: the first answer stands
    with sessions() as s:
        [row] = list_instances(s)
    assert row["state"] == "PREDICTED" and row["probability"] == pytest.approx(0.8)


def test_a_batch_of_predictions_is_recorded_once_each_and_says_which_were_new(sessions):
    with sessions.begin() as s:
        ids = [receive(s, "1.2.3", f"1.2.3.1.{n}")[0] for n in range(1, 5)]
        answer(s, [(ids[0], 0.9)])  # answered before the batch
    batch = [(ids[0], 0.1), (ids[1], 0.7), (ids[2], 0.2), (ids[1], 0.3), (ids[3], 0.6)]  # ids[1] twice
    with sessions.begin() as s:
        created = answer(s, batch)
    assert created == {ids[1], ids[2], ids[3]}
    with sessions() as s:
        rows = {row["sop_instance_uid"]: row for row in list_instances(s)}
        flags = s.execute(text("SELECT flagged FROM prediction ORDER BY instance_id")).scalars().all()
    assert [bool(flag) for flag in flags] == [True, True, False, True]  # one row each, the first answer
    assert [rows[f"1.2.3.1.{n}"]["probability"] for n in range(1, 5)] == pytest.approx([0.9, 0.7, 0.2, 0.6])
    assert {row["state"] for row in rows.values()} == {"PREDICTED"}
    with sessions.begin() as s:  # another model version answers the same instances anew
        assert answer(s, batch[:3], model_card("2.0", sha256="1" * 64)) == set(ids[:3])
        assert answer(s, [], model_card("2.0", sha256="1" * 64)) == set()


def test_terminal_state_is_never_left(sessions):
    with sessions.begin() as s:
        instance, _ = receive(s, "1.2.3", "1.2.3.1.1")
        assert set_state(s, instance_id=instance, state=InstanceState.SKIPPED, reason="lateral")
        assert not set_state(s, instance_id=instance, state=InstanceState.QUEUED)
    with sessions() as s:
        [row] = list_instances(s, state=InstanceState.SKIPPED)
    assert row["reason"] == "lateral"


def test_population_notes_are_set_when_prepared_and_shown_for_screened_images(sessions):
    unknown = "age unknown: not confirmed within the intended population (ages 1-5)"
    outside = "outside the intended population: patient aged 45 years (trained on ages 1-5)"
    with sessions.begin() as s:
        ids = [receive(s, "1.1", f"1.1.1.{n}", "MIXED")[0] for n in range(1, 4)]
        only, _ = receive(s, "1.2", "1.2.1.1", "UNKNOWN")
        plain, _ = receive(s, "1.3", "1.3.1.1", "PLAIN")
        later, _ = receive(s, "1.4", "1.4.1.1", "SKIPPED")
        touch_instances(s, ids=[*ids, only, plain, later], state=InstanceState.PREPROCESSED,
                        notes={ids[0]: unknown, ids[1]: outside, only: unknown, later: unknown})
        touch_instances(s, ids=ids, state=InstanceState.QUEUED)  # the reconciler: the notes stay
        answer(s, [(i, 0.3) for i in (*ids, only, plain)])
        set_state(s, instance_id=later, state=InstanceState.SKIPPED, reason="not readable")
    with sessions() as s:
        notes = {r["accession_number"]: r["population_note"] for r in worklist(s)}
        instances = {r["sop_instance_uid"]: r["population_note"] for r in list_instances(s)}
        detail = study_detail(s, study_instance_uid="1.1")
    assert notes == {"MIXED": outside, "UNKNOWN": unknown, "PLAIN": None, "SKIPPED": None}
    assert instances == {"1.1.1.1": unknown, "1.1.1.2": outside, "1.1.1.3": None, "1.2.1.1": unknown,
                         "1.3.1.1": None, "1.4.1.1": None}
    assert detail["population_note"] == outside
    assert [i["population_note"] for i in detail["instances"]] == [unknown, outside, None]


def test_worklist_puts_flagged_studies_first_by_probability(sessions):
    with sessions.begin() as s:
        routine, _ = receive(s, "1.1", "1.1.1.1", "ROUTINE")
        high, _ = receive(s, "1.2", "1.2.1.1", "HIGH")
        higher, _ = receive(s, "1.3", "1.3.1.1", "HIGHER")
        receive(s, "1.4", "1.4.1.1", "PENDING")
        answer(s, [(routine, 0.2)])
        answer(s, [(high, 0.7)])
        answer(s, [(higher, 0.95)])
    with sessions() as s:
        rows = worklist(s)
        flagged = worklist(s, flagged_only=True)
        limited = worklist(s, limit=1)
    assert [r["accession_number"] for r in rows] == ["HIGHER", "HIGH", "PENDING", "ROUTINE"]
    assert [r["priority"] for r in rows] == [PRIORITY_FLAGGED, PRIORITY_FLAGGED, PRIORITY_PENDING, PRIORITY_ROUTINE]
    assert [r["state"] for r in rows] == ["SCREENED", "SCREENED", "IN_PROGRESS", "SCREENED"]
    assert rows[0]["max_probability"] == pytest.approx(0.95) and rows[0]["flagged"] is True
    assert rows[0]["model_version"] == "1.0" and rows[0]["received_at"].endswith("+00:00")
    assert [r["accession_number"] for r in flagged] == ["HIGHER", "HIGH"]
    assert len(limited) == 1


def test_a_good_copy_replaces_an_unparseable_one_but_never_the_reverse(sessions):
    from db.queries import record_unreadable

    with sessions.begin() as s:
        assert record_unreadable(s, SOPInstanceUID="1.2.3.1.1", SOPClassUID="1.2", TransferSyntaxUID="1.2.840.10008.1.2.1",
                                 path="/quarantine/x.dcm", size_bytes=5, calling_ae="PACS", reason="truncated") is not None
    with sessions.begin() as s:
        instance_id, created = receive(s, "1.2.3", "1.2.3.1.1")
        assert created
    with sessions.begin() as s:
        assert record_unreadable(s, SOPInstanceUID="1.2.3.1.1", SOPClassUID="1.2", TransferSyntaxUID="1.2.840.10008.1.2.1",
                                 path="/quarantine/y.dcm", size_bytes=5, calling_ae="PACS", reason="truncated") is None
    with sessions() as s:
        [row] = list_instances(s)
    assert row["state"] == "RECEIVED" and row["study_instance_uid"] == "1.2.3" and row["reason"] is None


def test_worklist_filters_by_state_and_received_date_and_orders_by_choice(sessions):
    with sessions.begin() as s:
        low, _ = receive(s, "1.1", "1.1.1.1", "LOW")
        high, _ = receive(s, "1.2", "1.2.1.1", "HIGH")
        receive(s, "1.3", "1.3.1.1", "PENDING")
        skipped, _ = receive(s, "1.4", "1.4.1.1", "SKIPPED")
        failed, _ = receive(s, "1.5", "1.5.1.1", "FAILED")
        answer(s, [(low, 0.6)])
        answer(s, [(high, 0.9)])
        set_state(s, instance_id=skipped, state=InstanceState.SKIPPED, reason="lateral")
        set_state(s, instance_id=failed, state=InstanceState.FAILED, reason="bad codestream")
    now = utcnow()
    with sessions() as s:
        by_received = worklist(s, order="received")
        assert [r["accession_number"] for r in worklist(s)][:2] == ["HIGH", "LOW"]
        assert [r["accession_number"] for r in by_received][:2] == ["LOW", "HIGH"]
        assert [r["accession_number"] for r in worklist(s, state="IN_PROGRESS")] == ["PENDING"]
        assert [r["accession_number"] for r in worklist(s, state="NOT_SCREENED")] == ["SKIPPED"]
        assert [r["accession_number"] for r in worklist(s, state="FAILED")] == ["FAILED"]
        assert {r["accession_number"] for r in worklist(s, state="SCREENED")} == {"HIGH", "LOW"}
        assert worklist(s, received_since=now) == []
        assert len(worklist(s, received_until=now)) == 5
        assert len(worklist(s, limit=2, offset=4)) == 1
        assert by_received[0]["study_date"] == "20261102" and by_received[0]["images"] == 1
        with pytest.raises(ValueError):
            worklist(s, state="DONE")


def test_rescreen_requeues_what_the_new_model_has_not_answered_and_reports_changes(sessions):
    with sessions.begin() as s:
        a, _ = receive(s, "1.1", "1.1.1.1", "A")
        b, _ = receive(s, "1.2", "1.2.1.1", "B")
        c, _ = receive(s, "1.3", "1.3.1.1", "C")
        skipped, _ = receive(s, "1.4", "1.4.1.1", "D")
        answer(s, [(a, 0.2)], model_card("1.0"))
        answer(s, [(b, 0.8)], model_card("1.0"))
        answer(s, [(c, 0.9)], model_card("2.0"))  # already screened by the new model
        set_state(s, instance_id=skipped, state=InstanceState.SKIPPED, reason="lateral")
    with sessions.begin() as s:
        ids = requeue_for_model(s, model_version="2.0")
    assert ids == [a, b]
    with sessions.begin() as s:
        assert requeue_for_model(s, model_version="2.0") == []  # QUEUED now: not twice
        assert {r["sop_instance_uid"]: r["state"] for r in list_instances(s)}["1.1.1.1"] == "QUEUED"
        # still flagged on the worklist by the old answer while the new one is pending
        assert worklist(s, flagged_only=True)[0]["accession_number"] in {"B", "C"}
        assert rescreen_changes(s, instance_ids=ids, model_version="2.0")["pending"] == 2
    with sessions.begin() as s:
        answer(s, [(a, 0.7)], model_card("2.0"))
        answer(s, [(b, 0.3)], model_card("2.0"))
    with sessions() as s:
        changes = rescreen_changes(s, instance_ids=ids, model_version="2.0")
        rows = {r["accession_number"]: r for r in worklist(s)}
        detail = study_detail(s, study_instance_uid="1.1")
        assert study_detail(s, study_instance_uid="9.9") is None
    assert changes["rescreened"] == 2 and changes["newly_flagged"] == 1 and changes["unflagged"] == 1
    assert changes["changed_studies"] == [
        {"study_instance_uid": "1.1", "accession_number": "A", "flagged_before": False, "flagged_after": True},
        {"study_instance_uid": "1.2", "accession_number": "B", "flagged_before": True, "flagged_after": False},
    ]
    assert rows["A"]["flagged"] and rows["A"]["model_version"] == "2.0"
    assert not rows["B"]["flagged"] and rows["B"]["max_probability"] == pytest.approx(0.3)
    [instance] = detail["instances"]
    assert [p["model_version"] for p in instance["predictions"]] == ["1.0", "2.0"]
    assert instance["probability"] == pytest.approx(0.7) and detail["flagged"] is True
    assert detail["study_date"] == "20261102" and instance["state"] == "PREDICTED"


def test_requeue_for_model_honours_the_received_window(sessions):
    with sessions.begin() as s:
        a, _ = receive(s, "1.1", "1.1.1.1", "A")
        answer(s, [(a, 0.2)], model_card("1.0"))
    now = utcnow()
    with sessions.begin() as s:
        assert requeue_for_model(s, model_version="2.0", received_since=now) == []
        assert requeue_for_model(s, model_version="2.0", received_until=now) == [a]


def test_requeue_for_model_takes_instances_skipped_before_the_rescreen_only_when_asked(sessions):
    with sessions.begin() as s:
        a, _ = receive(s, "1.1", "1.1.1.1", "A")
        skipped, _ = receive(s, "1.2", "1.2.1.1", "B")
        answer(s, [(a, 0.2)], model_card("1.0"))
        set_state(s, instance_id=skipped, state=InstanceState.SKIPPED, reason="outside the intended population")
    started = utcnow()
    with sessions.begin() as s:
        assert requeue_for_model(s, model_version="2.0", skipped_before=started) == [a, skipped]
        [row] = [r for r in list_instances(s) if r["sop_instance_uid"] == "1.2.1.1"]
        assert (row["state"], row["reason"]) == ("QUEUED", None)
    with sessions.begin() as s:  # skipped again during this rescreen: not taken twice
        set_state(s, instance_id=skipped, state=InstanceState.SKIPPED, reason="lateral")
        assert requeue_for_model(s, model_version="2.0", skipped_before=started) == []
        assert rescreen_changes(s, instance_ids=[a, skipped], model_version="2.0")["not_screened"] == 1
        assert requeue_for_model(s, model_version="2.0") == []  # without being asked: never


def test_a_study_report_is_claimed_by_one_sender_and_requested_again_when_the_study_grows(sessions):
    from db import deliveries

    with sessions.begin() as s:
        first, _ = receive(s, "1.1", "1.1.1.1", "A")
        second, _ = receive(s, "1.1", "1.1.1.2", "A")
        answer(s, [(first, 0.9)])
        assert deliveries.completed_studies(s, instance_ids=[first]) == [], "an image of the study is still open"
        touch_instances(s, ids=[second], state=InstanceState.PREPROCESSED, notes={second: "age unknown"})
        answer(s, [(second, 0.1)])
        [study_id] = deliveries.completed_studies(s, instance_ids=[first, second])
        delivery = deliveries.request_delivery(s, study_id=study_id, model_version="1.0", destination="PACS@pacs:104")
    past, future = utcnow().replace(year=2000), utcnow().replace(year=2999)
    with sessions.begin() as s:
        assert deliveries.claim_delivery(s, delivery_id=delivery, stale_before=past)
        assert not deliveries.claim_delivery(s, delivery_id=delivery, stale_before=past), "one sender at a time"
        job = deliveries.delivery_job(s, delivery_id=delivery)
        assert job.StudyInstanceUID == "1.1" and [i.SOPInstanceUID for i in job.images] == ["1.1.1.1", "1.1.1.2"]
        assert [i.flagged for i in job.images] == [True, False] and job.attempts == 1
        assert [i.population_note for i in job.images] == [None, "age unknown"]  # for the report's comments
        deliveries.release_delivery(s, delivery_id=delivery, reason="PACS down", final=False)
        assert deliveries.stale_deliveries(s, older_than=future) == [delivery]
        assert deliveries.claim_delivery(s, delivery_id=delivery, stale_before=past)
        assert deliveries.finish_delivery(s, delivery_id=delivery, receipt="1.2.3.4", instance_count=2)
        assert deliveries.delivery_counts(s) == {"SENT": 1}
        assert deliveries.stale_deliveries(s, older_than=future) == []
    with sessions.begin() as s:  # a late image: the same row asks for a new report
        assert deliveries.request_delivery(s, study_id=study_id, model_version="1.0", destination="PACS@pacs:104") == delivery
        assert deliveries.delivery_counts(s) == {"PENDING": 1}
        assert deliveries.claim_delivery(s, delivery_id=delivery, stale_before=past)
        deliveries.fail_delivery(s, delivery_id=delivery, reason="gave up")
        assert deliveries.delivery_counts(s) == {"FAILED": 1}


def test_studies_answered_without_a_report_asked_for_are_found_until_one_is(sessions):
    """What a worker killed between recording a batch's answers and asking for the reports leaves."""
    from db import deliveries

    pacs, other = "PACS@pacs:104", "ARCHIVE@archive:104"
    with sessions.begin() as s:
        a1, _ = receive(s, "2.1", "2.1.1.1")
        a2, _ = receive(s, "2.1", "2.1.1.2")
        b1, _ = receive(s, "2.2", "2.2.1.1")
        receive(s, "2.2", "2.2.1.2")  # still in flight
        c1, _ = receive(s, "2.3", "2.3.1.1")
        d1, _ = receive(s, "2.4", "2.4.1.1")
        set_state(s, instance_id=d1, state=InstanceState.SKIPPED, reason="lateral")
        answer(s, [(a1, 0.9), (a2, 0.2), (b1, 0.7), (c1, 0.1)])
        study = {uid: deliveries.completed_studies(s, instance_ids=[i]) for uid, i in (("2.1", a1), ("2.3", c1))}
        c_delivery = deliveries.request_delivery(s, study_id=study["2.3"][0], model_version="1.0", destination=pacs)
    past, future = utcnow().replace(year=2000), utcnow().replace(year=2999)

    def unreported(destination=pacs, before=future):
        with sessions.begin() as s:
            return deliveries.unreported_studies(s, destination=destination, answered_since=past,
                                                 answered_before=before)

    [a_study], [c_study] = study["2.1"], study["2.3"]
    assert unreported() == [(a_study, "1.0")], "study 2.2 is still open, 2.3 was asked for, 2.4 has no answer"
    assert unreported(before=past) == [], "answered too recently: the worker may still be asking"
    assert unreported(other) == [(a_study, "1.0"), (c_study, "1.0")], "reports are per destination"
    with sessions.begin() as s:
        deliveries.request_delivery(s, study_id=a_study, model_version="1.0", destination=pacs)
        assert deliveries.claim_delivery(s, delivery_id=c_delivery, stale_before=past)
        deliveries.finish_delivery(s, delivery_id=c_delivery, receipt="1.2.3", instance_count=1)
    assert unreported() == []
    with sessions.begin() as s:  # a late image of 2.3 answered after its report was sent, then the worker died
        c2, _ = receive(s, "2.3", "2.3.1.2")
        answer(s, [(c2, 0.8)])
    assert unreported() == [(c_study, "1.0")]
    with sessions.begin() as s:  # a new model's answers need their own report
        answer(s, [(a1, 0.5)], model_card("2.0"))
    assert unreported() == [(a_study, "2.0"), (c_study, "1.0")]


def _plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.mark.parametrize("statistics", ["VACUUM", "ANALYZE"])
def test_the_unreported_report_query_reads_the_instance_table_once_whatever_the_planner_knows(pg_url, statistics):
    """With row counts but no column statistics (after a VACUUM, before autovacuum's ANALYZE) a
    planner takes the day's answers for one row; the "study still open" check must not then be
    rescanned per answer: per answer, an index probe at this size, a sequential scan of the whole
    table at 50,000 studies a day (minutes, see bench/reconcile.py)."""
    from db import deliveries

    upgrade(pg_url)
    engine = make_engine(pg_url)
    fill_answered_day(make_sessionmaker(engine), studies=3000, missing=3, destination="PACS@pacs:104", version="1.0")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        for table in ("study", "series", "instance", "prediction", "result_delivery"):
            c.execute(text(f"{statistics} {table}"))
    now = utcnow()
    statement = deliveries.unreported_studies_statement(destination="PACS@pacs:104",
                                                        answered_since=now - timedelta(hours=24), answered_before=now)
    sql = statement.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as c:
        [(plan,)] = c.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")).all()
        found = c.execute(statement).all()
    engine.dispose()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    scans = [(n["Node Type"], n["Actual Loops"]) for n in _plan_nodes(plan[0]["Plan"])
             if n.get("Relation Name") == "instance"]
    assert len(found) == 3
    assert all(loops == 1 for _, loops in scans), f"instance scanned per answered study: {scans}"


def test_received_window_turns_local_days_into_utc_bounds():
    from datetime import date, datetime, timezone

    from db.results import received_window

    since, until = received_window(date(2026, 11, 1), date(2026, 11, 30), "Europe/Berlin")
    assert since == datetime(2026, 10, 31, 23, 0, tzinfo=timezone.utc)
    assert until == datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc)  # the end of the 30th, Berlin time
    assert received_window(None, None, "UTC") == (None, None)
    with pytest.raises(ValueError, match="before"):
        received_window(date(2026, 11, 2), date(2026, 11, 1), "UTC")
