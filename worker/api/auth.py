"""Authentication and audit for the HTTP API: the bearer-token dependency and the
middleware that writes one audit entry per request to a token-protected endpoint."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import HTTPException, Security
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.audit import record_audit
from worker import runtime

log = logging.getLogger(__name__)

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
    """Who asked: the web session's actor (set by the pages' auth), else the bearer token's fingerprint."""
    actor = (scope.get("state") or {}).get("actor")
    if actor:
        return actor
    if scope.get("path", "").startswith("/web/"):
        return "web:anonymous"
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
        status = next(m["status"] for m in held if m["type"] == "http.response.start")
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
