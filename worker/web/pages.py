"""The radiologists' pages: sign-in, the worklist, a study with its films and Grad-CAM overlays,
and the operations page. Server-rendered (Jinja2), every asset served from the package.

The routes live on the module's ``router``; what they share (the settings, the sign-in sessions,
the render cache) is one ``PageContext`` on ``app.state.pages``, set by ``worker.web.install``.
Each page needs a session (``session.PageAuth``); every request to a page, refused ones
included, is audited like an API call (``worker.api.auth.AuditMiddleware``).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from db.deliveries import list_deliveries
from db.models import DeliveryState, InstanceState
from db.results import (
    StudyState,
    instance_path,
    list_instances,
    model_versions,
    received_window,
    study_detail,
    unscreened_reasons,
    worklist,
)
from worker import runtime
from db.accounts import Role
from db.verdicts import Finding, study_verdicts
from worker.api.auth import Principal
from worker.api.schemas import UID_PATTERN
from worker.api.verdicts import record as record_verdict_for
from worker.delivery.config import configured_kinds
from worker.images import UnreadableInput
from worker.settings import Settings
from worker.web.renders import RenderCache, card_plot_png, film_png, gradcam_png
from worker.web.operations import TimedCache, drift_plot, drift_view, site_view
from worker.web.session import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_HOURS,
    PageAuth,
    Sessions,
    WebSession,
    check_csrf,
    cookie_flags,
    safe_next,
)

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=FilePath(__file__).parent / "templates")
# a population note's badge: its words before the colon ("age unknown", "outside the intended population")
TEMPLATES.env.filters["note_label"] = lambda note: str(note).split(":", 1)[0]
PAGE_SIZE = 50
REFRESH_SECONDS = 30
_NO_STORE = {"Cache-Control": "no-store"}

router = APIRouter(include_in_schema=False)


@dataclass
class PageContext:
    """What every page shares in one application: its settings, its sign-in sessions, its renders."""

    settings: Settings
    sessions: Sessions
    page_auth: PageAuth
    cache: RenderCache = field(default_factory=RenderCache)
    computed: TimedCache = field(default_factory=TimedCache)


def page_context(request: Request) -> PageContext:
    return request.app.state.pages


def signed_in(request: Request) -> WebSession:
    """The dependency of every page but sign-in: the session, or a redirect to sign in."""
    return page_context(request).page_auth(request)


SessionDep = Annotated[Session, Depends(runtime.request_session)]
ContextDep = Annotated[PageContext, Depends(page_context)]
SignedIn = Annotated[WebSession, Depends(signed_in)]


def render(request: Request, template: str, session: WebSession | None, status_code: int = 200,
           **context) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, template, {"web": session, **context}, status_code=status_code,
                                      headers=_NO_STORE)


def _card(settings: Settings):
    from model.artifact import ModelArtifactError, read_card

    try:
        return read_card(settings.model_dir, verify=False)
    except (ModelArtifactError, ValueError, OSError) as exc:
        log.warning("the pages show no model card: %s", exc)
        return None


def _login_form(request: Request, next_path: str | None, error: str | None = None,
                status_code: int = 200) -> HTMLResponse:
    csrf = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, status_code=status_code, csrf=csrf,
                      next=safe_next(next_path), error=error)
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, max_age=3600, **cookie_flags(request))
    return response


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/web/worklist", status_code=303)


@router.get("/web/login")
def login_page(request: Request, pages: ContextDep, next: str | None = None) -> Response:  # noqa: A002
    request.state.actor = "web:anonymous"
    if pages.sessions.read(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_form(request, next)


@router.post("/web/login")
def sign_in(request: Request, pages: ContextDep, token: Annotated[str, Form(max_length=512)],
            csrf_token: Annotated[str, Form(max_length=128)],
            next: Annotated[str, Form(max_length=2048)] = "/web/worklist",  # noqa: A002
            name: Annotated[str, Form(max_length=64)] = "") -> Response:
    """An account's name and password, or (no name) the installation's API token."""
    request.state.actor = "web:anonymous"
    check_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), csrf_token)
    sessions = pages.sessions
    client = request.client.host if request.client else "unknown"
    if sessions.too_many_failures(client):
        return _login_form(request, next, "Too many failed sign-ins from this address: wait a minute.", 429)
    account = sessions.account_matches(name, token) if name else None
    if account is None and (name or not sessions.token_matches(token)):
        sessions.failed(client)
        log.warning("failed sign-in to the web pages from %s", client)
        return _login_form(request, next, "That name and password do not match an enabled account." if name
                           else "That is not the API token of this installation.", 401)
    value, session = sessions.issue_for_account(account) if account is not None else sessions.issue()
    request.state.actor = session.actor
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, value, max_age=SESSION_HOURS * 3600, **cookie_flags(request))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/web/logout")
def sign_out(request: Request, web: SignedIn, csrf_token: Annotated[str, Form(max_length=128)]) -> Response:
    check_csrf(web.csrf, csrf_token)
    response = RedirectResponse("/web/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=cookie_flags(request)["secure"])
    return response


@router.get("/web/worklist")
def worklist_page(
    request: Request, session: SessionDep, pages: ContextDep, web: SignedIn,
    flagged_only: bool = False,
    state: Annotated[str, Query(max_length=16)] = "",
    since: Annotated[str, Query(max_length=10)] = "",
    until: Annotated[str, Query(max_length=10)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    """One page of the worklist in a fixed number of queries, however many rows it shows."""
    settings = pages.settings
    # the filter form sends its empty fields too: empty means "any"
    try:
        state = StudyState(state) if state else None
        since = date.fromisoformat(since) if since else None
        until = date.fromisoformat(until) if until else None
        received_since, received_until = received_window(since, until, settings.timezone)
    except ValueError as exc:
        raise HTTPException(422, f"not a filter the worklist knows: {exc}") from None
    rows = worklist(session, flagged_only=flagged_only, state=state, received_since=received_since,
                    received_until=received_until, order=settings.worklist_order,
                    limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    versions = model_versions(session)
    reasons = unscreened_reasons(session, study_instance_uids=[row["study_instance_uid"] for row in rows
                                                               if row["state"] != StudyState.SCREENED.value])
    for row in rows:
        row["threshold"] = versions.get(row["model_version"], {}).get("threshold")
        row["reasons"] = reasons.get(row["study_instance_uid"], [])
    request.state.result_count = len(rows)
    filters = {k: v for k, v in {"flagged_only": "true" if flagged_only else None,
                                 "state": state.value if state else None,
                                 "since": since.isoformat() if since else None,
                                 "until": until.isoformat() if until else None}.items() if v}
    return render(request, "worklist.html", web, rows=rows, filters=filters, page=page, more=more,
                  states=[s.value for s in StudyState], refresh=REFRESH_SECONDS, timezone=settings.timezone,
                  query=lambda **changes: urlencode({**filters, **changes}))


@router.get("/web/studies/{study_instance_uid}")
def study_page(request: Request, session: SessionDep, pages: ContextDep, web: SignedIn,
               study_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)]) -> HTMLResponse:
    study = study_detail(session, study_instance_uid=study_instance_uid)
    if study is None:
        raise HTTPException(404, "no such study")
    settings = pages.settings
    request.state.result_count = len(study["instances"])
    return render(request, "study.html", web, study={**study, **study_verdicts(session, study_instance_uid=study_instance_uid)},
                  versions=model_versions(session), card=_card(settings),
                  deliveries=list_deliveries(session, study_instance_uid=study_instance_uid),
                  reporting=configured_kinds(settings))


@router.post("/web/studies/{study_instance_uid}/verdict")
def verdict_form(request: Request, session: SessionDep, web: SignedIn,
                 study_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)],
                 finding: Annotated[Finding, Form()], csrf_token: Annotated[str, Form(max_length=128)]) -> Response:
    """The study page's verdict buttons: a radiologist's (or an admin's) finding, kept with every earlier one."""
    check_csrf(web.csrf, csrf_token)
    if not web.may_record_verdicts:
        raise HTTPException(403, f"the role {web.role} may not record verdicts")
    principal = Principal(web.actor.removeprefix("user:"), Role(web.role), web.actor, web.account_id)
    record_verdict_for(session, principal, study_instance_uid, finding)
    return RedirectResponse(f"/web/studies/{study_instance_uid}", status_code=303)


@router.get("/web/operations")
def operations_page(request: Request, session: SessionDep, pages: ContextDep, web: SignedIn) -> HTMLResponse:
    from db.metrics import pipeline_snapshot
    from worker.api.metrics import LATENCY_BUCKETS, broker_client, queue_depths

    settings = pages.settings
    snapshot = pipeline_snapshot(session, latency_buckets=LATENCY_BUCKETS)
    broker = broker_client(settings.broker_url) if settings.shares_broker else None
    card = _card(settings)
    site = site_view(session, pages.computed, settings=settings, card=card) if card else None
    drift = drift_view(session, pages.computed, settings=settings, card=card) if card else None
    return render(request, "operations.html", web, refresh=2 * REFRESH_SECONDS, snapshot=snapshot, site=site,
                  drift=drift,
                  queues=queue_depths(broker), shares_broker=settings.shares_broker,
                  failures=list_instances(session, state=InstanceState.FAILED, limit=20, newest_first=True),
                  failed_deliveries=list_deliveries(session, state=DeliveryState.FAILED, limit=20),
                  card=card, versions=model_versions(session),
                  intended_population=settings.intended_population)


@router.get("/web/images/{sop_instance_uid}/{kind}.png")
def image(session: SessionDep, pages: ContextDep, web: SignedIn,
          sop_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)],
          kind: Annotated[str, Path(pattern="^(film|gradcam)$")]) -> Response:
    path = instance_path(session, sop_instance_uid=sop_instance_uid)
    if path is None or not FilePath(path).is_file():
        raise HTTPException(404, "no such image in the spool")
    cache = pages.cache
    try:
        if kind == "film":
            png = cache.get_or_render((sop_instance_uid, "film", path), lambda: film_png(FilePath(path)))
        else:
            model = runtime.load_model()
            png = cache.get_or_render((sop_instance_uid, "gradcam", path, model.card.version),
                                      lambda: gradcam_png(FilePath(path), model))
    except UnreadableInput as exc:
        raise HTTPException(422, f"the image cannot be displayed: {exc}") from None
    return Response(png, media_type="image/png", headers=_NO_STORE)


@router.get("/web/plots/model.png")
def model_plot(pages: ContextDep, web: SignedIn) -> Response:
    card = _card(pages.settings)
    if card is None:
        raise HTTPException(404, "no model card")
    png = pages.cache.get_or_render(("card", card.version, card.sha256), lambda: card_plot_png(card))
    return Response(png, media_type="image/png", headers=_NO_STORE)


@router.get("/web/plots/drift.png")
def drift_histogram(session: SessionDep, pages: ContextDep, web: SignedIn) -> Response:
    card = _card(pages.settings)
    if card is None:
        raise HTTPException(404, "no model card")
    try:
        png = drift_plot(session, pages.computed, settings=pages.settings, card=card)
    except FileNotFoundError as exc:
        raise HTTPException(404, f"no drift plot: {exc}") from None
    return Response(png, media_type="image/png", headers=_NO_STORE)
