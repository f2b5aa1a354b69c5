"""The HTTP API as a real `pneumoscreen api` process over PostgreSQL and SQLite:
bearer-token refusals, the worklist, studies, instances, health, Prometheus
metrics, and one audit entry for each query; and the counts behind the metrics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, text, update

from db.audit import recent_audit, record_audit
from db.deliveries import claim_delivery, finish_delivery, release_delivery, request_delivery
from db.metrics import pipeline_snapshot
from db.migrate import alembic_config, upgrade
from db.models import Instance, InstanceState, Prediction, Study
from db.queries import set_state
from db.session import make_engine, make_sessionmaker
from model.artifact import read_card
from tests.helpers.processes import Process, cli_env, flushed_redis, free_port, run_cli, wait_for_port
from tests.helpers.records import answer, model_card, receive

TOKEN = "4f1c2e9a7b3d5f60718293a4b5c6d7e8"
WRONG_TOKEN = "0000000000000000wrong"
BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
UID = "1.2.826.0.1.3680043.10.1"
FLAG_EARLY, ROUTINE, RESCREENED, FLAG_LATE, FAILED, PENDING, SKIPPED = (f"{UID}.{n}" for n in range(1, 8))
ACCESSION = {FLAG_EARLY: "FLAG_EARLY", ROUTINE: "ROUTINE", RESCREENED: "RESCREENED", FLAG_LATE: "FLAG_LATE",
             FAILED: "FAILED", PENDING: "PENDING", SKIPPED: "SKIPPED"}
ORDER = {
    "probability": ["FLAG_LATE", "FLAG_EARLY", "FAILED", "PENDING", "RESCREENED", "ROUTINE", "SKIPPED"],
    "received": ["FLAG_EARLY", "FLAG_LATE", "FAILED", "PENDING", "ROUTINE", "RESCREENED", "SKIPPED"],
}
WORKLIST_FIELDS = {"study_instance_uid", "accession_number", "priority", "flagged", "max_probability", "state",
                   "received_at", "model_version", "population_note"}
INSTANCE_FIELDS = {"sop_instance_uid", "study_instance_uid", "series_instance_uid", "state", "reason", "probability",
                   "model_version", "population_note"}
AGE_UNKNOWN = "age unknown: not confirmed within the intended population (ages 1-5)"


def _at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=timezone.utc)


def populate(sessions) -> None:
    """Seven studies, eleven images; every latency and arrival time fixed.

    Screening latencies (queued -> prediction): 0.3, 45, 1.5, 5.0 (on a bucket
    bound) and 200 s; an image never queued and an answer older than its
    image's last queueing (a rescreen) have none.
    """
    def receive_image(s, study: str, n: int) -> int:
        return receive(s, study, f"{study}.1.{n}", ACCESSION[study], "20261101")[0]

    def predict(s, instance_id: int, p: float, *, queued: datetime | None, after: float, version: str = "1.0"):
        if queued is not None:
            s.execute(update(Instance).where(Instance.id == instance_id).values(queued_at=queued))
        answer(s, [(instance_id, p)], model_card(version))
        s.execute(update(Prediction).where(Prediction.instance_id == instance_id, Prediction.model_version == version)
                  .values(created_at=(queued or _at(1, 0)) + timedelta(seconds=after)))

    arrival = {FLAG_EARLY: _at(1, 8), ROUTINE: _at(2, 9), RESCREENED: _at(2, 10), FLAG_LATE: _at(3, 23, 30),
               FAILED: _at(3, 10), PENDING: _at(4, 12), SKIPPED: _at(4, 13)}
    with sessions.begin() as s:
        predict(s, receive_image(s, FLAG_EARLY, 1), 0.70, queued=_at(1, 8, 1), after=0.3)
        predict(s, receive_image(s, ROUTINE, 1), 0.10, queued=_at(2, 9, 1), after=45)
        predict(s, receive_image(s, ROUTINE, 2), 0.05, queued=None, after=1)
        rescreened = receive_image(s, RESCREENED, 1)
        s.execute(update(Instance).where(Instance.id == rescreened).values(population_note=AGE_UNKNOWN))
        predict(s, rescreened, 0.80, queued=_at(2, 10, 1), after=2)
        predict(s, rescreened, 0.30, queued=_at(20, 1), after=200, version="2.0")
        predict(s, receive_image(s, FLAG_LATE, 1), 0.95, queued=_at(3, 23, 31), after=1.5)
        predict(s, receive_image(s, FLAG_LATE, 2), 0.20, queued=_at(3, 23, 31), after=5.0)
        set_state(s, instance_id=receive_image(s, FAILED, 1), state=InstanceState.FAILED, reason="bad codestream")
        receive_image(s, PENDING, 1)
        set_state(s, instance_id=receive_image(s, PENDING, 2), state=InstanceState.QUEUED)
        set_state(s, instance_id=receive_image(s, PENDING, 3), state=InstanceState.PREPROCESSED)
        set_state(s, instance_id=receive_image(s, SKIPPED, 1), state=InstanceState.SKIPPED, reason="lateral view")
        for study, at in arrival.items():
            s.execute(update(Study).where(Study.StudyInstanceUID == study).values(received_at=at))
        study_id = dict(s.execute(select(Study.StudyInstanceUID, Study.id)).all())
        pending = request_delivery(s, study_id=study_id[FLAG_EARLY], model_version="1.0", destination="PACS@h:104")
        sent = request_delivery(s, study_id=study_id[FLAG_LATE], model_version="1.0", destination="PACS@h:104")
        failed = request_delivery(s, study_id=study_id[ROUTINE], model_version="1.0", destination="PACS@h:104")
    with sessions.begin() as s:
        later = _at(30, 0)
        assert claim_delivery(s, delivery_id=sent, stale_before=later)
        assert finish_delivery(s, delivery_id=sent, receipt="1.2.3", instance_count=2)
        assert claim_delivery(s, delivery_id=failed, stale_before=later)
        release_delivery(s, delivery_id=failed, reason="association rejected", final=True)
        assert pending


EXPECTED_LATENCY = {"buckets": (1, 1, 2, 3, 3, 3, 4, 4, 5, 5), "count": 5, "sum": 0.3 + 45 + 200 + 1.5 + 5.0}


@pytest.fixture
def database_url(any_database_url):
    return any_database_url


def test_pipeline_snapshot_counts_every_state_flag_model_and_latency(sessions):
    populate(sessions)
    with sessions() as s:
        snapshot = pipeline_snapshot(s, latency_buckets=BUCKETS)
    assert snapshot.instances_by_state == {"RECEIVED": 1, "QUEUED": 1, "PREPROCESSED": 1, "PREDICTED": 6,
                                           "SKIPPED": 1, "FAILED": 1}
    assert (snapshot.received, snapshot.screened, snapshot.flagged) == (11, 6, 2)
    assert (snapshot.failed, snapshot.skipped) == (1, 1)
    assert snapshot.predictions_by_model_version == {"1.0": 6, "2.0": 1}
    assert snapshot.deliveries_by_state == {"PENDING": 1, "SENDING": 0, "SENT": 1, "FAILED": 1}
    assert snapshot.latency.buckets == tuple(zip(BUCKETS, EXPECTED_LATENCY["buckets"]))
    assert snapshot.latency.count == EXPECTED_LATENCY["count"]
    assert snapshot.latency.sum == pytest.approx(EXPECTED_LATENCY["sum"], abs=1e-9)


def test_pipeline_snapshot_of_an_empty_database_is_all_zeros(sessions):
    with sessions() as s:
        snapshot = pipeline_snapshot(s, latency_buckets=(1, 10))
        with pytest.raises(ValueError, match="ascending"):
            pipeline_snapshot(s, latency_buckets=(10, 1))
    assert set(snapshot.instances_by_state.values()) == {0} and len(snapshot.instances_by_state) == 6
    assert snapshot.flagged == 0 and snapshot.predictions_by_model_version == {}
    assert snapshot.latency.buckets == ((1.0, 0), (10.0, 0)) and snapshot.latency.count == 0
    assert snapshot.latency.sum == 0.0


def test_audit_entries_read_back_newest_first_with_their_params(sessions):
    with sessions.begin() as s:
        record_audit(s, actor="api:anonymous", client="10.0.0.1", action="GET /worklist", params={"limit": "5"},
                     status=401, result_count=None)
        record_audit(s, actor="cli:radiology", client=None, action="worklist", params=None, status=200,
                     result_count=3)
        with pytest.raises(ValueError, match="status"):
            record_audit(s, actor="api:x", client=None, action="GET /", params=None, status=42, result_count=None)
    with sessions() as s:
        newest, oldest = recent_audit(s)
        assert recent_audit(s, since=datetime.now(timezone.utc) + timedelta(minutes=1)) == []
        assert len(recent_audit(s, limit=1)) == 1
    assert (newest["actor"], newest["action"], newest["params"], newest["result_count"]) == (
        "cli:radiology", "worklist", None, 3)
    assert oldest["params"] == {"limit": "5"} and oldest["status"] == 401 and oldest["client"] == "10.0.0.1"
    assert oldest["at"].endswith("+00:00")


class Client:
    """httpx against the API process, noting the audit entry each request must leave."""

    def __init__(self, port: int) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.expected: list[tuple[str, str, int, int | None, dict[str, Any]]] = []

    def get(self, path: str, *, action: str | None = None, token: str | None = TOKEN, params=None,
            audit_params: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.http.get(path, params=params, headers=headers)
        if action is not None:
            count = len(response.json()) if response.status_code == 200 and action != "GET /metrics" \
                and isinstance(response.json(), list) else None
            actor = "api:anonymous" if token is None else f"api:{_fingerprint(token)}"
            self.expected.append((actor, action, response.status_code, count,
                                  audit_params if audit_params is not None else dict(params or {})))
        return response

    def worklist(self, **params) -> list[str]:
        response = self.get("/worklist", action="GET /worklist", params=params)
        assert response.status_code == 200, response.text
        return [row["accession_number"] for row in response.json()]


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _samples(text_: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text_) for s in family.samples}


@pytest.fixture
def broker_url(redis_url) -> Iterator[str]:
    """A Redis database of its own (not the one worker tests consume from) for the queue lengths."""
    with flushed_redis(redis_url.rsplit("/", 1)[0] + "/14") as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("backend, order, zone", [("postgresql", "probability", "UTC"),
                                                  ("sqlite", "received", "Europe/Berlin")])
def test_api_answers_with_the_token_refuses_without_and_audits_every_query(
    backend, order, zone, request, tmp_path, processes, broker_url
):
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    populate(sessions)
    broker = broker_url if backend == "postgresql" else "memory://"
    if backend == "postgresql":
        with redis.Redis.from_url(broker_url) as queues:
            queues.rpush("preprocess", "a", "b")
            queues.rpush("inference\x06\x163", "c")  # a prioritised message: kombu's key for priority 3
    port = free_port()
    env = cli_env(database_url=url, api_token=TOKEN, api_port=port, broker_url=broker, worklist_order=order,
                  timezone=zone)
    api = Process(["api"], env, tmp_path / "api.log")
    processes.append(api)
    wait_for_port(port, api.proc)
    c = Client(port)

    # refused: no token, a wrong one, another scheme; each refusal audited
    for token in (None, WRONG_TOKEN):
        refused = c.get("/worklist", action="GET /worklist", token=token, params={"flagged_only": "true"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "study_instance_uid" not in refused.text
    assert c.get("/metrics", action="GET /metrics", token=None).status_code == 401
    basic = c.http.get("/instances", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    c.expected.append(("api:anonymous", "GET /instances", 401, None, {}))

    # the worklist: order from the settings, filters, paging, validation
    assert c.worklist() == ORDER[order]
    assert c.worklist(flagged_only="true") == [a for a in ORDER[order] if a.startswith("FLAG")]
    assert c.worklist(state="IN_PROGRESS") == ["PENDING"]
    assert c.worklist(state="FAILED") == ["FAILED"]
    assert c.worklist(state="NOT_SCREENED") == ["SKIPPED"]
    assert c.worklist(state="SCREENED") == [a for a in ORDER[order] if a in {"FLAG_LATE", "FLAG_EARLY", "ROUTINE",
                                                                           "RESCREENED"}]
    # FLAG_LATE arrived 2026-11-03 23:30 UTC: 3 November in UTC, 4 November in Berlin
    on_the_3rd = ["FLAG_LATE", "FAILED"] if zone == "UTC" else ["FAILED"]
    assert c.worklist(since="2026-11-03", until="2026-11-03") == on_the_3rd
    assert c.worklist(since="2026-11-04") == (["PENDING", "SKIPPED"] if zone == "UTC"
                                              else ["FLAG_LATE", "PENDING", "SKIPPED"])
    assert c.worklist(until="2026-11-01") == ["FLAG_EARLY"]
    assert c.worklist(limit="2", offset="1") == ORDER[order][1:3]
    for bad in ({"limit": "0"}, {"limit": "1001"}, {"state": "DONE"}, {"since": "3 Nov"},
                {"since": "2026-11-04", "until": "2026-11-03"}, {"offset": str(2**63)}):
        assert c.get("/worklist", action="GET /worklist", params=bad).status_code == 422, bad
    # a body no endpoint takes is refused before any route reads it (and is not audited: no route ran)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert c.http.post("/worklist", content=bytes(1 << 20), headers=headers).status_code == 413
    assert c.http.post("/worklist", content=iter([b"x" * 1024] * 4), headers=headers).status_code == 411
    assert c.http.get("/worklist", headers={**headers, "X-Padding": "x" * (256 << 10)}).status_code in (400, 431)
    rows = c.get("/worklist", action="GET /worklist").json()
    assert set(rows[0]) >= WORKLIST_FIELDS
    top = rows[ORDER[order].index("FLAG_LATE")]
    assert top["study_instance_uid"] == FLAG_LATE and top["flagged"] is True and top["priority"] == 1
    assert top["max_probability"] == pytest.approx(0.95) and top["state"] == "SCREENED"
    assert top["images"] == 2 and top["study_date"] == "20261101" and top["model_version"] == "1.0"
    assert top["received_at"] == "2026-11-03T23:30:00+00:00" and top["population_note"] is None
    assert [r["population_note"] for r in rows if r["accession_number"] == "RESCREENED"] == [AGE_UNKNOWN]

    # one study, with every model's answers
    detail = c.get(f"/studies/{RESCREENED}", action="GET /studies/{study_instance_uid}",
                   audit_params={"study_instance_uid": RESCREENED})
    assert detail.status_code == 200
    body = detail.json()
    assert body["accession_number"] == "RESCREENED" and body["flagged"] is False and body["model_version"] == "2.0"
    [image] = body["instances"]
    assert [p["model_version"] for p in image["predictions"]] == ["1.0", "2.0"]
    assert [p["flagged"] for p in image["predictions"]] == [True, False]
    assert image["probability"] == pytest.approx(0.3) and image["state"] == "PREDICTED"
    assert body["population_note"] == image["population_note"] == AGE_UNKNOWN
    unknown = c.get("/studies/1.2.3.4.5", action="GET /studies/{study_instance_uid}",
                    audit_params={"study_instance_uid": "1.2.3.4.5"})
    assert unknown.status_code == 404 and unknown.json() == {"detail": "no study 1.2.3.4.5"}
    assert c.get("/studies/not-a-uid", action="GET /studies/{study_instance_uid}",
                 audit_params={"study_instance_uid": "not-a-uid"}).status_code == 422

    # instances
    all_instances = c.get("/instances", action="GET /instances").json()
    assert len(all_instances) == 11 and set(all_instances[0]) == INSTANCE_FIELDS
    [failed] = c.get("/instances", action="GET /instances", params={"state": "FAILED"}).json()
    assert failed["sop_instance_uid"] == f"{FAILED}.1.1" and failed["reason"] == "bad codestream"
    late = c.get("/instances", action="GET /instances", params={"study": FLAG_LATE}).json()
    assert [r["probability"] for r in late] == [pytest.approx(0.95), pytest.approx(0.2)]
    page = c.get("/instances", action="GET /instances", params={"limit": "3", "offset": "9"}).json()
    assert [r["sop_instance_uid"] for r in page] == [r["sop_instance_uid"] for r in all_instances[9:]]
    # a parameter the API does not know is not recorded, whatever it holds
    c.get("/instances", action="GET /instances", params={"state": "SKIPPED", "access_token": TOKEN},
          audit_params={"state": "SKIPPED"})

    # health: no token needed, nothing audited
    health = c.http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "schema": "current",
                             "model_version": read_card().version, "detail": None}

    # metrics: exactly what the database holds
    metrics = c.get("/metrics", action="GET /metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    samples = _samples(metrics.text)
    assert samples[("pneumoscreen_instances_received_total", ())] == 11
    assert samples[("pneumoscreen_instances_screened_total", ())] == 6
    assert samples[("pneumoscreen_instances_flagged_total", ())] == 2
    assert samples[("pneumoscreen_instances_failed_total", ())] == 1
    assert samples[("pneumoscreen_instances_skipped_total", ())] == 1
    for state in ("RECEIVED", "QUEUED", "PREPROCESSED"):
        assert samples[("pneumoscreen_instances", (("state", state),))] == 1
    assert samples[("pneumoscreen_predictions_total", (("model_version", "1.0"),))] == 6
    assert samples[("pneumoscreen_predictions_total", (("model_version", "2.0"),))] == 1
    assert {state: samples[("pneumoscreen_result_deliveries", (("state", state),))]
            for state in ("PENDING", "SENDING", "SENT", "FAILED")} == {"PENDING": 1, "SENDING": 0, "SENT": 1,
                                                                        "FAILED": 1}
    histogram = "pneumoscreen_screening_latency_seconds"
    assert [samples[(f"{histogram}_bucket", (("le", str(b)),))] for b in BUCKETS] == list(EXPECTED_LATENCY["buckets"])
    assert samples[(f"{histogram}_bucket", (("le", "+Inf"),))] == 5
    assert samples[(f"{histogram}_count", ())] == 5
    assert samples[(f"{histogram}_sum", ())] == pytest.approx(EXPECTED_LATENCY["sum"])
    depth = {dict(labels)["queue"]: value for (name, labels), value in samples.items()
             if name == "pneumoscreen_queue_depth"}
    assert depth == ({"preprocess": 2, "inference": 1, "maintenance": 0} if backend == "postgresql" else {})

    # the OpenAPI schema: five paths, the bearer scheme on all but /healthz, the documented fields
    schema = c.http.get("/openapi.json").json()
    assert schema["info"]["title"] == "pneumoscreen"
    assert set(schema["paths"]) == {"/worklist", "/studies/{study_instance_uid}", "/instances", "/healthz", "/metrics",
                                    "/studies/{study_instance_uid}/verdict", "/accounts", "/accounts/{name}/disable",
                                    "/dicomweb/studies", "/dicomweb/studies/{study}"}
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "a personal API token (`pneumoscreen users add`), or the installation's "
                       "PNEUMOSCREEN_API_TOKEN, as `Authorization: Bearer <token>`"}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert operation.get("security") == (None if path == "/healthz" else [{"bearer": []}]), path
    components = schema["components"]["schemas"]
    assert set(components["WorklistRow"]["properties"]) >= WORKLIST_FIELDS
    assert set(components["InstanceRow"]["properties"]) == INSTANCE_FIELDS
    assert set(components["InstanceState"]["enum"]) == {s.value for s in InstanceState}
    assert c.http.get("/docs").status_code == 200

    # every query audited, in order, with actor, action, status, rows and params; the token nowhere
    with sessions() as s:
        audit = list(reversed(recent_audit(s, limit=1000)))
    engine.dispose()
    assert [(a["actor"], a["action"], a["status"], a["result_count"], a["params"]) for a in audit] == c.expected
    assert {a["client"] for a in audit} == {"127.0.0.1"}
    assert TOKEN not in json.dumps(audit) and TOKEN not in api.log()
    assert f"GET /worklist 200 rows=7 by api:{_fingerprint(TOKEN)} from 127.0.0.1" in api.log()


@pytest.mark.slow
def test_healthz_says_503_when_the_schema_falls_behind_or_the_database_goes(tmp_path, pg_url, processes):
    from alembic import command

    upgrade(pg_url)
    with_password = pg_url.replace("postgres@", "postgres:pw-never-shown@")  # trust auth: accepted, unused
    port = free_port()
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    api = Process(["api"], cli_env(database_url=with_password, api_token=TOKEN, api_port=port, broker_url=dead_broker),
                  tmp_path / "api.log")
    processes.append(api)
    wait_for_port(port, api.proc)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})
    assert http.get("/healthz").json()["status"] == "ok"

    # a broker that does not answer: the queue depth is left out, with a warning
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert "pneumoscreen_instances_received_total 0.0" in metrics.text
    assert "pneumoscreen_queue_depth" not in metrics.text
    assert "queue depth left out of the metrics" in api.log()

    command.downgrade(alembic_config(pg_url), "0001")
    behind = http.get("/healthz")
    assert behind.status_code == 503
    assert behind.json() == {"status": "unavailable", "database": "ok", "schema": "not current",
                             "model_version": read_card().version, "detail": "run `pneumoscreen db upgrade`"}
    # the old schema's instance table lacks the newer columns: the instances cannot be read
    old_schema = http.get("/instances")
    assert old_schema.status_code == 503
    assert old_schema.json() == {"detail": "the database is unavailable (see /healthz)"}
    # the instances answer, but the audit log is gone: no answer goes out unaudited
    upgrade(pg_url)
    schema = create_engine(pg_url)
    with schema.begin() as connection:
        connection.execute(text("DROP TABLE audit_log"))
    schema.dispose()
    unaudited = http.get("/instances")
    assert unaudited.status_code == 503
    assert unaudited.json() == {"detail": "the request could not be recorded in the audit log"}

    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{pg_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()
    gone = http.get("/healthz")
    assert gone.status_code == 503
    assert gone.json()["database"] == "unreachable" and gone.json()["schema"] == "unknown"
    # nothing can be answered or audited now: 503, and the lost audit entry is logged
    assert http.get("/worklist").status_code == 503
    assert "could not write the audit entry of GET /worklist" in api.log()
    assert "pw-never-shown" not in gone.text and "pw-never-shown" not in api.log()


@pytest.mark.slow
def test_api_will_not_start_without_a_token_or_on_an_old_schema(tmp_path, sqlite_url):
    no_token = run_cli("api", env=cli_env(database_url=sqlite_url), check=False)
    assert no_token.returncode != 0
    assert ("set PNEUMOSCREEN_API_TOKEN to a secret of at least 16 characters, e.g. `openssl rand -hex 32`"
            in no_token.stderr)
    short = run_cli("api", env=cli_env(database_url=sqlite_url, api_token="short"), check=False)
    assert short.returncode != 0 and "at least 16 characters" in short.stderr
    old_schema = run_cli("api", env=cli_env(database_url=sqlite_url, api_token=TOKEN), check=False)
    assert old_schema.returncode != 0 and "pneumoscreen db upgrade" in old_schema.stderr
