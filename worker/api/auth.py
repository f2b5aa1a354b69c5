"""Authentication, roles and audit for the HTTP API: the bearer-token dependency (the shared
``PNEUMOSCREEN_API_TOKEN``, an admin/service credential, or an account's personal token), the
role check, and the middleware that writes one audit entry per request to a token-protected
endpoint, naming the account."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.accounts import Role, account_for_token
from db.audit import record_audit
from worker import audit, runtime

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="a personal API token (`pneumoscreen users add`), or the installation's "
                                 "PNEUMOSCREEN_API_TOKEN, as `Authorization: Bearer <token>`")


def token_fingerprint(token: str) -> str:
    """A name for a token that does not reveal it: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Principal:
    """Who a request comes from."""

    name: str
    """The account's name; ``service`` for the installation's shared token."""
    role: Role
    actor: str
    """As the audit log and the verdicts name it: ``user:<name>``, or ``api:<token fingerprint>`` for the shared token."""
    account_id: int | None = None


def account_principal(account) -> Principal:
    return Principal(account.name, Role(account.role), f"user:{account.name}", account.id)


class BearerAuth:
    """The dependency of every endpoint that needs a token: 401 without one, or with one that is
    neither the shared token nor an enabled account's. Names the actor for the audit log."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")
        self._service = Principal("service", Role.ADMIN, f"api:{token_fingerprint(token)}")

    def resolve(self, token: str) -> Principal | None:
        if secrets.compare_digest(token.encode("utf-8"), self._token):
            return self._service
        with runtime.sessions()() as session:
            account = account_for_token(session, token=token)
            return None if account is None else account_principal(account)

    def __call__(self, request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal:
        principal = None if credentials is None else self.resolve(credentials.credentials)
        if principal is None:
            audit.refused_token(address=request.client.host if request.client else None, path=request.url.path,
                                actor="api:anonymous" if credentials is None
                                else f"api:{token_fingerprint(credentials.credentials)}")
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        request.state.actor = principal.actor
        request.state.principal = principal
        return principal


def require_role(auth: BearerAuth, *roles: Role) -> Callable[..., Principal]:
    """A dependency: the request's principal when its role is one of ``roles`` (admin always is), else 403."""
    allowed = frozenset(roles) | {Role.ADMIN}

    def check(principal: Principal = Depends(auth)) -> Principal:  # a default: ``auth`` is local, not a global
        if principal.role not in allowed:
            raise HTTPException(403, f"the role {principal.role.value} may not do this; it needs "
                                     + " or ".join(sorted(r.value for r in allowed)))
        return principal

    return check


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
