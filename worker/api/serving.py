"""How ``pneumoscreen api`` serves: uvicorn with bounds on slow clients, and TLS from the settings.

- Request line and headers must arrive within ``PNEUMOSCREEN_API_HEADER_TIMEOUT`` seconds of the
  connection (or of the previous answer, on a kept-alive one): uvicorn bounds only the idle time
  between requests (``timeout_keep_alive``), so a client sending a header byte a second (slowloris)
  would hold its connection for ever; ``HeaderTimeoutH11Protocol`` closes it.
- A request, its body included, must be answered within ``PNEUMOSCREEN_API_REQUEST_TIMEOUT``
  seconds (``RequestDeadline``): 408 while the body is still arriving, 503 after.
- With ``PNEUMOSCREEN_API_TLS_CERT``/``_KEY``, TLS (1.2 at least) and ``Strict-Transport-Security``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import h11
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker.settings import Settings

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 200
"""Concurrent connections per API process; more are answered 503."""
MAX_HEADER_BYTES = 16 << 10
"""Request line and headers still arriving are refused beyond this (h11's limit); headers that
arrive whole are bounded by what h11 reads at once (64 KiB)."""
KEEP_ALIVE_SECONDS = 5
HSTS = "max-age=31536000"
"""One year; no includeSubDomains: the API's host name may be shared with other services."""


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers take longer than
    ``header_timeout`` seconds to arrive."""

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's head has the same bound

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        client = self.client[0] if self.client else "unknown"
        log.warning("closed a connection from %s: no complete request head within %g s", client, self.header_timeout)
        self.transport.close()


class RequestDeadline:
    """Pure ASGI middleware: a request not answered within ``seconds`` gets 408 (its body was still
    arriving) or 503 (the answer took too long); one whose answer had started is cut off."""

    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        started = False

        async def tracked_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, tracked_receive, tracked_send), self.seconds)
        except asyncio.TimeoutError:
            client = (scope.get("client") or ("unknown", 0))[0]
            log.warning("%s %s from %s: not answered within %g s", scope["method"], scope["path"][:200], client,
                        self.seconds)
            if started:
                raise
            status, detail = (503, "the request took too long") if body_done else \
                (408, "the request body did not arrive in time")
            await JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})(
                scope, receive, send)


class StrictTransportSecurity:
    """Pure ASGI middleware: ``Strict-Transport-Security`` on every answer (the API serves TLS itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"strict-transport-security", HSTS.encode())]}
            await send(message)

        await self.app(scope, receive, with_hsts)


def serves_tls(settings: Settings) -> bool:
    return settings.api_tls_cert is not None


def server_config(settings: Settings, app):
    """uvicorn's configuration for ``app``: the bounds above, TLS when the settings give a certificate."""
    import uvicorn

    protocol = type("BoundedH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": settings.api_header_timeout})
    tls = {}
    if serves_tls(settings):
        tls = {"ssl_certfile": str(settings.api_tls_cert), "ssl_keyfile": str(settings.api_tls_key),
               "ssl_version": ssl.PROTOCOL_TLS_SERVER}
    # logging stays as the CLI set it up; no access log (the audit log records every query)
    return uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None, access_log=False,
                          server_header=False, lifespan="off", limit_concurrency=MAX_CONNECTIONS,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                          http=protocol, **tls)
