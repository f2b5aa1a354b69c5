"""The HTTP API: the worklist, studies and instances for people and RIS
systems, health and Prometheus metrics for operators.

Every endpoint but ``/healthz`` needs the bearer token (``PNEUMOSCREEN_API_TOKEN``),
and every request to one of them, refused or not, leaves one row in the audit
log before its answer goes out. The database is the source of truth for all of
it, so any number of API processes give the same answers.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from importlib.metadata import version as package_version
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import redis
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.audit import record_audit
from db.metrics import pipeline_snapshot
from db.migrate import alembic_config
from db.models import InstanceState
from db.results import StudyState, list_instances, study_detail, worklist
from worker import runtime
from worker.celery_app import ALL_QUEUES
from worker.settings import Settings

log = logging.getLogger(__name__)

#: upper bounds (seconds) of the screening latency histogram
LATENCY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
#: instance states still in flight, one gauge each
IN_FLIGHT_STATES = (InstanceState.RECEIVED, InstanceState.QUEUED, InstanceState.PREPROCESSED)
_UID = r"^[0-9]+(\.[0-9]+)*$"
_DATE_TIME = {"format": "date-time"}


# --- response bodies -------------------------------------------------------------------------------------------

class WorklistRow(BaseModel):
    """One study on the radiologists' worklist (a row of ``pneumoscreen worklist --json``)."""

    study_instance_uid: str
    accession_number: str | None
    priority: int = Field(description="1 flagged, 2 in progress or with images that failed, 3 routine")
    flagged: bool = Field(description="some image's latest prediction is at or above its model's threshold")
    max_probability: float | None = Field(description="highest latest probability of pneumonia among its images")
    state: StudyState
    received_at: str | None = Field(description="first image received (UTC, ISO 8601)", json_schema_extra=_DATE_TIME)
    model_version: str | None
    study_date: str | None = Field(description="DICOM StudyDate as sent (YYYYMMDD)")
    images: int = Field(description="images received for the study")


class InstanceRow(BaseModel):
    """One received image (a row of ``pneumoscreen instances --json``)."""

    sop_instance_uid: str
    study_instance_uid: str | None = Field(description="None for a dataset that could not be parsed")
    series_instance_uid: str | None
    state: InstanceState
    reason: str | None = Field(description="why it was skipped or failed")
    probability: float | None = Field(description="latest probability of pneumonia")
    model_version: str | None


class PredictionOut(BaseModel):
    """One model's answer for one image."""

    model_name: str
    model_version: str
    weights_sha256: str
    probability: float
    threshold: float
    flagged: bool
    created_at: str | None = Field(json_schema_extra=_DATE_TIME)


class StudyInstance(BaseModel):
    """An image of a study, with every model's answer, oldest first."""

    sop_instance_uid: str
    series_instance_uid: str
    modality: str | None
    sop_class_uid: str
    state: InstanceState
    reason: str | None
    received_at: str | None = Field(json_schema_extra=_DATE_TIME)
    probability: float | None = Field(description="latest probability of pneumonia")
    model_version: str | None
    predictions: list[PredictionOut]


class StudyDetail(BaseModel):
    """A study: its worklist row and its images."""

    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    received_at: str | None = Field(json_schema_extra=_DATE_TIME)
    priority: int | None = None
    flagged: bool | None = None
    max_probability: float | None = None
    state: StudyState | None = None
    model_version: str | None = None
    images: int | None = None
    instances: list[StudyInstance]


class Health(BaseModel):
    """Whether this API can answer: its database is reachable and its schema current."""

    model_config = ConfigDict(populate_by_name=True)

    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unreachable"]
    schema_state: Literal["current", "not current", "unknown"] = Field(alias="schema")
    model_version: str | None = Field(description="version of the configured model artifact")
    detail: str | None = None


class ErrorDetail(BaseModel):
    detail: Any


# --- authentication and audit ----------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="the API token (PNEUMOSCREEN_API_TOKEN) as `Authorization: Bearer <token>`")


def token_fingerprint(token: str) -> str:
    """A name for a token that does not reveal it: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


class BearerAuth:
    """The dependency of every endpoint that needs the token: 401 without it or with another."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode("utf-8"), self._token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _actor(scope: Scope) -> str:
    scheme, token = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
    if scheme.lower() == "bearer" and token:
        return f"api:{token_fingerprint(token)}"
    return "api:anonymous"


def _params(scope: Scope, route: APIRoute) -> dict[str, Any]:
    """The route's own query parameters as sent (nothing else: a stray secret stays out) and its path parameters."""
    query = QueryParams(scope.get("query_string", b""))
    params: dict[str, Any] = {}
    for field in route.dependant.query_params:
        values = query.getlist(field.alias)
        if values:
            params[field.alias] = values[0] if len(values) == 1 else values
    params.update(scope.get("path_params") or {})
    return params


class AuditMiddleware:
    """Writes one audit entry for each request to an endpoint that needs the token,
    refused and failed ones included, before the answer goes out. An answer whose
    entry cannot be written is not sent: the client gets 503 instead."""

    def __init__(self, app: ASGIApp, *, is_audited: Callable[[Any], bool]) -> None:
        self.app = app
        self.is_audited = is_audited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []
        audited: bool | None = None

        async def hold_until_audited(message: Message) -> None:
            nonlocal audited
            if audited is None:  # the first message: routing is done by now
                audited = self.is_audited(scope.get("route"))
            if not audited:
                await send(message)
                return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self._send_audited(scope, held, send)

        try:
            await self.app(scope, receive, hold_until_audited)
        except Exception:
            if audited is None and self.is_audited(scope.get("route")):
                await run_in_threadpool(self._write, scope, 500)
            raise

    async def _send_audited(self, scope: Scope, held: list[Message], send: Send) -> None:
        status = held[0]["status"]
        if not await run_in_threadpool(self._write, scope, status) and status < 400:
            refusal = JSONResponse({"detail": "the request could not be recorded in the audit log"}, status_code=503)
            await refusal(scope, _no_receive, send)
            return
        for message in held:
            await send(message)

    @staticmethod
    def _write(scope: Scope, status: int) -> bool:
        route: APIRoute = scope["route"]
        action = f"{scope['method']} {route.path}"
        actor = _actor(scope)
        client = scope["client"][0] if scope.get("client") else None
        result_count = (scope.get("state") or {}).get("result_count") if status < 400 else None
        try:
            with runtime.sessions().begin() as session:
                record_audit(session, actor=actor, client=client, action=action, params=_params(scope, route),
                             status=status, result_count=result_count)
        except SQLAlchemyError as exc:
            log.error("could not write the audit entry of %s by %s (status %d): %s", action, actor, status, exc)
            return False
        log.info("%s %d%s by %s from %s", action, status,
                 "" if result_count is None else f" rows={result_count}", actor, client)
        return True


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# --- metrics ---------------------------------------------------------------------------------------------------

def _broker_client(broker_url: str) -> redis.Redis | None:
    """A client for the broker's queue lengths when the broker is Redis (none for memory:// and others)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    return redis.Redis.from_url(broker_url, socket_timeout=2.0, socket_connect_timeout=2.0)


#: kombu's Redis transport keeps a queue's prioritised messages in "<queue>\x06\x16<priority>" lists
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class PipelineCollector(Collector):
    """Prometheus metrics read at each scrape: counts from the database, queue lengths from Redis."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session]], broker: redis.Redis | None) -> None:
        self._sessions = sessions
        self._broker = broker

    def collect(self) -> list[Metric]:
        with self._sessions()() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})  # one consistent view
            snapshot = pipeline_snapshot(session, latency_buckets=LATENCY_BUCKETS)
        metrics: list[Metric] = [
            CounterMetricFamily("pneumoscreen_instances_received_total", "Instances received, whatever their state",
                                value=snapshot.received),
            CounterMetricFamily("pneumoscreen_instances_screened_total", "Instances screened (PREDICTED)",
                                value=snapshot.screened),
            CounterMetricFamily("pneumoscreen_instances_flagged_total",
                                "Instances whose latest prediction is flagged", value=snapshot.flagged),
            CounterMetricFamily("pneumoscreen_instances_failed_total", "Instances that could not be screened",
                                value=snapshot.failed),
            CounterMetricFamily("pneumoscreen_instances_skipped_total", "Instances not eligible for screening",
                                value=snapshot.skipped),
        ]
        predictions = CounterMetricFamily("pneumoscreen_predictions_total", "Predictions stored, by model version",
                                          labels=["model_version"])
        for model_version, count in snapshot.predictions_by_model_version.items():
            predictions.add_metric([model_version], count)
        in_flight = GaugeMetricFamily("pneumoscreen_instances", "Instances in flight, by state", labels=["state"])
        for state in IN_FLIGHT_STATES:
            in_flight.add_metric([state.value], snapshot.instances_by_state[state.value])
        deliveries = GaugeMetricFamily("pneumoscreen_result_deliveries", "Result reports to the PACS, by state",
                                       labels=["state"])
        for state, count in snapshot.deliveries_by_state.items():
            deliveries.add_metric([state], count)
        latency = snapshot.latency
        histogram = HistogramMetricFamily(
            "pneumoscreen_screening_latency_seconds", "Seconds from an instance being queued to its prediction",
            buckets=[*((floatToGoString(bound), count) for bound, count in latency.buckets), ("+Inf", latency.count)],
            sum_value=latency.sum,
        )
        metrics += [predictions, in_flight, deliveries, histogram]
        depth = self._queue_depth()
        if depth is not None:
            metrics.append(depth)
        return metrics

    def _queue_depth(self) -> GaugeMetricFamily | None:
        if self._broker is None:
            return None
        try:
            with self._broker.pipeline(transaction=False) as pipe:
                for queue in ALL_QUEUES:
                    for suffix in _PRIORITY_SUFFIXES:
                        pipe.llen(queue + suffix)
                lengths = pipe.execute()
        except redis.RedisError as exc:
            log.warning("queue depth left out of the metrics: the broker did not answer (%s)", exc)
            return None
        depth = GaugeMetricFamily("pneumoscreen_queue_depth", "Messages waiting in the broker, by queue",
                                  labels=["queue"])
        for i, queue in enumerate(ALL_QUEUES):
            depth.add_metric([queue], sum(lengths[i * len(_PRIORITY_SUFFIXES):(i + 1) * len(_PRIORITY_SUFFIXES)]))
        return depth


# --- the application -------------------------------------------------------------------------------------------

def _session() -> Iterator[Session]:
    """A session per request from the process's one session factory."""
    with runtime.sessions()() as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many rows")]
Offset = Annotated[int, Query(ge=0, description="skip this many rows first")]
Since = Annotated[date | None, Query(description="received on or after this day (in PNEUMOSCREEN_TIMEZONE)")]
Until = Annotated[date | None, Query(description="received on or before this day (in PNEUMOSCREEN_TIMEZONE)")]


def _configured_model_version(settings: Settings) -> str | None:
    from model.artifact import ModelArtifactError, read_card

    try:
        return read_card(settings.model_dir, verify=False).version
    except (ModelArtifactError, ValueError, OSError) as exc:
        log.warning("health will show no model version: %s", exc)
        return None


def _day_start(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=zone).astimezone(timezone.utc)


def _results_router(settings: Settings, auth: BearerAuth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], tags=["results"],
                       responses={401: {"model": ErrorDetail, "description": "missing or wrong bearer token"}})
    zone = ZoneInfo(settings.timezone)

    @router.get("/worklist", response_model=list[WorklistRow], summary="Studies in reading order")
    def get_worklist(
        request: Request, session: SessionDep,
        flagged_only: Annotated[bool, Query(description="only studies the model flagged")] = False,
        since: Since = None, until: Until = None,
        state: Annotated[StudyState | None, Query(description="only studies in this state")] = None,
        limit: Limit = 100, offset: Offset = 0,
    ) -> list[dict[str, Any]]:
        """Flagged studies first, then studies in progress or with images that failed, then the rest;
        within a priority by PNEUMOSCREEN_WORKLIST_ORDER (probability or received)."""
        if since is not None and until is not None and since > until:
            raise HTTPException(422, f"since ({since}) is after until ({until})")
        rows = worklist(session, flagged_only=flagged_only, limit=limit, offset=offset, state=state,
                        received_since=None if since is None else _day_start(since, zone),
                        received_until=None if until is None else _day_start(until + timedelta(days=1), zone),
                        order=settings.worklist_order)
        request.state.result_count = len(rows)
        return rows

    @router.get("/studies/{study_instance_uid}", response_model=StudyDetail, summary="One study and its images",
                responses={404: {"model": ErrorDetail, "description": "no such study"}})
    def get_study(
        session: SessionDep,
        study_instance_uid: Annotated[str, Path(max_length=64, pattern=_UID, description="StudyInstanceUID")],
    ) -> dict[str, Any]:
        """The study's worklist row and each image with every model's answer."""
        detail = study_detail(session, study_instance_uid=study_instance_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_instance_uid}")
        return detail

    @router.get("/instances", response_model=list[InstanceRow], summary="Received images and their states")
    def get_instances(
        request: Request, session: SessionDep,
        state: Annotated[InstanceState | None, Query(description="only images in this state")] = None,
        study: Annotated[str | None, Query(max_length=64, pattern=_UID, description="only this study's images")] = None,
        limit: Limit = 100, offset: Offset = 0,
    ) -> list[dict[str, Any]]:
        """Every received image with its state, the reason it was skipped or failed, and its latest probability."""
        rows = list_instances(session, state=state, study_instance_uid=study, limit=limit, offset=offset)
        request.state.result_count = len(rows)
        return rows

    return router


def _operations_router(settings: Settings, auth: BearerAuth) -> APIRouter:
    router = APIRouter(tags=["operations"])
    heads = set(ScriptDirectory.from_config(alembic_config(settings.effective_database_url)).get_heads())
    model_version = _configured_model_version(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(runtime.sessions, _broker_client(settings.broker_url)))

    @router.get("/healthz", response_model=Health, summary="Can this API answer?",
                responses={503: {"model": Health, "description": "the database is unreachable or not current"}})
    def healthz() -> JSONResponse:
        """No token needed. 200 when the database answers and its schema is current, 503 otherwise."""
        health = Health(status="ok", database="ok", schema="current", model_version=model_version)
        try:
            with runtime.sessions()() as session:
                current = set(MigrationContext.configure(session.connection()).get_current_heads())
        except SQLAlchemyError as exc:
            log.warning("health: the database is unreachable: %s", exc)
            health = health.model_copy(update={"status": "unavailable", "database": "unreachable",
                                               "schema_state": "unknown", "detail": "the database is unreachable"})
        else:
            if current != heads:
                health = health.model_copy(update={"status": "unavailable", "schema_state": "not current",
                                                   "detail": "run `pneumoscreen db upgrade`"})
        return JSONResponse(health.model_dump(by_alias=True), status_code=200 if health.status == "ok" else 503)

    @router.get("/metrics", dependencies=[Depends(auth)], response_class=Response, summary="Prometheus metrics",
                responses={200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {}}, "description": "text exposition"},
                           401: {"model": ErrorDetail, "description": "missing or wrong bearer token"}})
    def metrics() -> Response:
        """Counts from the database (and queue lengths from a Redis broker), in the Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return router


def create_app(settings: Settings) -> FastAPI:
    """The API for ``settings``; installs them process-wide (one engine and session factory per process)."""
    if settings.api_token is None:
        raise ValueError("the HTTP API needs a token: set PNEUMOSCREEN_API_TOKEN")
    runtime.configure(settings)
    auth = BearerAuth(settings.api_token.get_secret_value())
    app = FastAPI(
        title="pneumoscreen", version=package_version("pneumoscreen"),
        description="Pneumonia screening results for chest X-rays: the worklist, studies, instances; "
                    "health and metrics. Every endpoint but /healthz needs `Authorization: Bearer <token>`.",
        openapi_tags=[{"name": "results", "description": "what the model said, for people and RIS systems"},
                      {"name": "operations", "description": "health and Prometheus metrics"}],
        docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
    )
    app.include_router(_results_router(settings, auth))
    app.include_router(_operations_router(settings, auth))

    def is_audited(route: Any) -> bool:
        return isinstance(route, APIRoute) and any(d.dependency is auth for d in route.dependencies)

    app.add_middleware(AuditMiddleware, is_audited=is_audited)

    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("%s %s: database error: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the database is unavailable (see /healthz)"}, status_code=503)

    return app
