"""The HTTP API: the worklist, studies and instances for people and RIS
systems, health and Prometheus metrics for operators.

Every endpoint but ``/healthz`` needs the bearer token (``PNEUMOSCREEN_API_TOKEN``),
and every request to one of them, refused or not, leaves one row in the audit
log before its answer goes out. The database is the source of truth for all of
it, so any number of API processes give the same answers.
"""

from __future__ import annotations

import logging
from datetime import date
from importlib.metadata import version as package_version
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from db.migrate import applied_revisions, head_revisions
from db.models import InstanceState
from db.results import StudyState, list_instances, received_window, study_detail, worklist
from db.verdicts import study_verdicts
from worker import runtime
from worker.api.accounts import accounts_router
from worker.api.auth import AuditMiddleware, BearerAuth
from worker.api.drift_metrics import DriftCollector
from worker.api.dicomweb import PREFIX as DICOMWEB
from worker.api.dicomweb import dicomweb_router
from worker.api.metrics import PipelineCollector, broker_client
from worker.api.serving import RequestDeadline, StrictTransportSecurity, serves_tls
from worker.api.schemas import UID_PATTERN, ErrorDetail, Health, InstanceRow, StudyDetail, WorklistRow
from worker.api.verdicts import verdicts_router
from worker.audit.spool import AuditSpoolCollector
from worker.settings import Settings

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 64 << 10
"""No endpoint takes more; a request announcing more is refused before any route reads it."""


class RequestBounds:
    """Pure ASGI middleware: a body over ``MAX_REQUEST_BODY`` is answered 413, one of unknown
    length (chunked) 411, before the application sees the request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(f"{DICOMWEB}/"):  # STOW-RS bounds its own
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            refusal = None
            if b"transfer-encoding" in headers:
                refusal = (411, "a request body must have a Content-Length")
            elif length is not None and (not length.isdigit() or int(length) > MAX_REQUEST_BODY):
                refusal = (413, f"a request body may have {MAX_REQUEST_BODY} bytes at most")
            if refusal is not None:
                client = scope.get("client") or ("unknown", 0)
                log.warning("%s %s from %s refused: %s", scope["method"], scope["path"][:200], client[0], refusal[1])
                response = JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


SessionDep = Annotated[Session, Depends(runtime.request_session)]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many rows")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many rows first")]
Since = Annotated[date | None, Query(description="received on or after this day (in PNEUMOSCREEN_TIMEZONE)")]
Until = Annotated[date | None, Query(description="received on or before this day (in PNEUMOSCREEN_TIMEZONE)")]


def _configured_model_version(settings: Settings) -> str | None:
    from model.artifact import ModelArtifactError, read_card

    try:
        return read_card(settings.model_dir, verify=False).version
    except (ModelArtifactError, ValueError, OSError) as exc:
        log.warning("health will show no model version: %s", exc)
        return None


def _results_router(settings: Settings, auth: BearerAuth) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], tags=["results"],
                       responses={401: {"model": ErrorDetail, "description": "missing or wrong bearer token"}})

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
        try:
            received_since, received_until = received_window(since, until, settings.timezone)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        rows = worklist(session, flagged_only=flagged_only, limit=limit, offset=offset, state=state,
                        received_since=received_since, received_until=received_until,
                        order=settings.worklist_order)
        request.state.result_count = len(rows)
        return rows

    @router.get("/studies/{study_instance_uid}", response_model=StudyDetail, summary="One study and its images",
                responses={404: {"model": ErrorDetail, "description": "no such study"}})
    def get_study(
        session: SessionDep,
        study_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN, description="StudyInstanceUID")],
    ) -> dict[str, Any]:
        """The study's worklist row and each image with every model's answer."""
        detail = study_detail(session, study_instance_uid=study_instance_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_instance_uid}")
        return {**detail, **study_verdicts(session, study_instance_uid=study_instance_uid)}

    @router.get("/instances", response_model=list[InstanceRow], summary="Received images and their states")
    def get_instances(
        request: Request, session: SessionDep,
        state: Annotated[InstanceState | None, Query(description="only images in this state")] = None,
        study: Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN, description="only this study's images")] = None,
        limit: Limit = 100, offset: Offset = 0,
    ) -> list[dict[str, Any]]:
        """Every received image with its state, the reason it was skipped or failed, and its latest probability."""
        rows = list_instances(session, state=state, study_instance_uid=study, limit=limit, offset=offset)
        request.state.result_count = len(rows)
        return rows

    return router


def _operations_router(settings: Settings, auth: BearerAuth) -> APIRouter:
    router = APIRouter(tags=["operations"])
    heads = head_revisions(settings.effective_database_url)
    model_version = _configured_model_version(settings)
    registry = CollectorRegistry(auto_describe=False)
    broker = broker_client(settings.broker_url) if settings.shares_broker else None
    registry.register(PipelineCollector(runtime.sessions, broker))
    registry.register(DriftCollector(runtime.sessions, settings.model_dir, settings.drift_window))
    registry.register(AuditSpoolCollector(settings.data_dir / "audit"))

    @router.get("/healthz", response_model=Health, summary="Can this API answer?",
                responses={503: {"model": Health, "description": "the database is unreachable or not current"}})
    def healthz() -> JSONResponse:
        """No token needed. 200 when the database answers and its schema is current, 503 otherwise."""
        health = Health(status="ok", database="ok", schema="current", model_version=model_version)
        try:
            with runtime.sessions()() as session:
                current = applied_revisions(session.connection())
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
    # Swagger UI and ReDoc from the assets fastapi-offline ships, not from a CDN
    app = FastAPIOffline(
        title="pneumoscreen", version=package_version("pneumoscreen"),
        description="Pneumonia screening results for chest X-rays: the worklist, studies, instances; "
                    "health and metrics. Every endpoint but /healthz needs `Authorization: Bearer <token>`. "
                    "The web pages for people are at /web/worklist.",
        openapi_tags=[{"name": "results", "description": "what the model said, for people and RIS systems"},
                      {"name": "operations", "description": "health and Prometheus metrics"},
                      {"name": "accounts", "description": "named accounts and their roles (admins only)"}],
        docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json", static_url="/static-offline-docs",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.include_router(_results_router(settings, auth))
    app.include_router(verdicts_router(auth))
    app.include_router(dicomweb_router(auth, settings))
    app.include_router(accounts_router(auth))
    app.include_router(_operations_router(settings, auth))
    from worker import web

    web.install(app, settings)

    def is_audited(route: Any) -> bool:
        """Every endpoint that needs the token, and every page (their sign-in included)."""
        if not isinstance(route, APIRoute):
            return False
        return route.path.startswith("/web/") or any(d.dependency is auth for d in route.dependencies)

    app.add_middleware(AuditMiddleware, is_audited=is_audited)
    app.add_middleware(RequestBounds)
    if serves_tls(settings):
        app.add_middleware(StrictTransportSecurity)
    app.add_middleware(RequestDeadline, seconds=settings.api_request_timeout)  # the outermost: bounds them all

    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("%s %s: database error: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the database is unavailable (see /healthz)"}, status_code=503)

    return app
