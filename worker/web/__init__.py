"""The web pages for radiologists and operators, served by ``pneumoscreen api`` (same process,
same token, same audit log): ``session`` (sign-in, cookies, CSRF), ``pages`` (the routes),
``renders`` (films, overlays and plots, rendered on demand), ``templates/`` and ``static/``.
Nothing is loaded from another host."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from worker.settings import Settings
from worker.web.pages import PageContext, router
from worker.web.session import NotSignedIn, PageAuth, Sessions

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI, settings: Settings) -> PageAuth:
    """Add the pages and their assets to ``app``; returns the pages' auth dependency."""
    sessions = Sessions(settings.api_token.get_secret_value())
    page_auth = PageAuth(sessions)
    app.state.pages = PageContext(settings, sessions, page_auth)
    app.include_router(router)
    app.mount("/web/static", StaticFiles(directory=STATIC), name="web-static")

    @app.exception_handler(NotSignedIn)
    async def sign_in_first(request: Request, exc: NotSignedIn) -> RedirectResponse:
        return RedirectResponse(f"/web/login?next={exc.next_path}", status_code=303)

    return page_auth
