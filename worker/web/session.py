"""Sign-in for the web pages: an account's name and password (argon2-checked), or the API token,
entered once, becomes a signed session cookie.

- The cookie holds the token's fingerprint or the account's name (never a secret), a CSRF secret
  and its issue time, signed with a key derived from the token: a new token ends every session.
  An account's session also ends when it is disabled or its password changes (checked on every page).
  HttpOnly, SameSite=Strict, Path=/, Secure when the page is served over TLS (directly, or
  behind a proxy that says so with X-Forwarded-Proto); it lasts ``SESSION_HOURS``.
- Every form carries a CSRF token: the session's secret once signed in, and before that a
  random value in a second cookie (double submit), so no other site can post a form here.
- Failed sign-ins are limited per client address (``MAX_FAILED_SIGN_INS`` per
  ``SIGN_IN_WINDOW`` seconds, then 429) and audited like every other request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import HTTPException, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from worker import audit
from worker.api.auth import token_fingerprint

SESSION_COOKIE = "pneumoscreen_session"
LOGIN_CSRF_COOKIE = "pneumoscreen_login_csrf"
SESSION_HOURS = 12
MAX_FAILED_SIGN_INS = 5
SIGN_IN_WINDOW = 60.0


@dataclass(frozen=True)
class WebSession:
    actor: str
    """``user:<account>``, or ``web:<token fingerprint>`` signed in with the shared token, as the audit log names it."""
    csrf: str
    role: str = "admin"
    """The account's role (``db.accounts.Role``); the shared token signs in as admin."""
    account_id: int | None = None

    @property
    def may_record_verdicts(self) -> bool:
        return self.role in ("radiologist", "admin")


class NotSignedIn(Exception):
    """A page asked for without a valid session: the answer is a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def is_tls(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_flags(request: Request) -> dict:
    return {"httponly": True, "samesite": "strict", "path": "/", "secure": is_tls(request)}


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a path of this site, never another host."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/web/worklist"
    return path


class Sessions:
    """Issues and checks session cookies for the token ``token``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")
        key = hmac.new(self._token, b"pneumoscreen web session", hashlib.sha256).hexdigest()
        self._serializer = URLSafeTimedSerializer(key, salt="session")
        self._actor = f"web:{token_fingerprint(token)}"
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def token_matches(self, candidate: str) -> bool:
        return secrets.compare_digest(candidate.encode("utf-8"), self._token)

    def account_matches(self, name: str, password: str):
        """The enabled account ``name`` whose password is ``password``, or None (argon2, same cost either way)."""
        from db.accounts import account_for_password
        from worker import runtime

        with runtime.sessions().begin() as session:
            return account_for_password(session, name=name, password=password)

    @staticmethod
    def _password_stamp(password_hash: str | None) -> str:
        """Changes with the password: a session signed in with an old one ends."""
        return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]

    def issue_for_account(self, account) -> tuple[str, WebSession]:
        session = WebSession(f"user:{account.name}", secrets.token_urlsafe(24), account.role, account.id)
        audit.user_authentication(succeeded=True, user=session.actor, address=None)
        return self._serializer.dumps({"a": session.actor, "c": session.csrf, "u": account.name,
                                       "p": self._password_stamp(account.password_hash)}), session

    def _read_account(self, data: dict) -> WebSession | None:
        """The session of an account cookie while the account is enabled and its password unchanged."""
        from db.accounts import enabled_account
        from worker import runtime

        with runtime.sessions()() as session:
            account = enabled_account(session, name=str(data["u"]))
            if account is None or data.get("p") != self._password_stamp(account.password_hash):
                return None
            return WebSession(f"user:{account.name}", data["c"], account.role, account.id)

    def issue(self) -> tuple[str, WebSession]:
        session = WebSession(self._actor, secrets.token_urlsafe(24))
        audit.user_authentication(succeeded=True, user=session.actor, address=None)
        return self._serializer.dumps({"a": session.actor, "c": session.csrf}), session

    def read(self, request: Request) -> WebSession | None:
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=SESSION_HOURS * 3600)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        if data.get("u"):
            return self._read_account(data)
        if data.get("a") != self._actor:
            return None
        return WebSession(data["a"], data["c"])

    def too_many_failures(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = self._failures.get(client)
            while recent and now - recent[0] > SIGN_IN_WINDOW:
                recent.popleft()
            return bool(recent) and len(recent) >= MAX_FAILED_SIGN_INS

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # a flood from many addresses cannot grow this without bound
                self._failures.clear()
            self._failures.setdefault(client, deque()).append(time.monotonic())
        audit.user_authentication(succeeded=False, user="web:anonymous", address=client,
                                  reason="not the API token of this installation")


class PageAuth:
    """The dependency of every page: the session, or a redirect to sign in. It also names the
    actor for the audit log."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def __call__(self, request: Request) -> WebSession:
        session = self.sessions.read(request)
        if session is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise NotSignedIn(quote(target, safe="/?=&"))
        request.state.actor = session.actor
        return session


def check_csrf(expected: str | None, given: str | None) -> None:
    if not expected or not given or not secrets.compare_digest(expected.encode(), given.encode()):
        raise HTTPException(403, "the form has expired or did not come from this site: load the page again")
