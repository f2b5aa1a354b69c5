"""Named accounts: who signs in, with which role, by a personal API token or a web password.

A token is 256 random bits shown once and stored as its SHA-256 (a hash that cannot be
searched backwards from a value that random); a password, chosen by a person, is stored as an
argon2id hash (argon2-cffi's defaults, RFC 9106's second recommended profile). A disabled
account's token and password stop working at once; a new token revokes the old one.
Session in, caller commits, like every data function here.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Account, utcnow

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
_hasher = PasswordHasher()
# verified against when the name is unknown, so that a wrong name costs the same time as a wrong password
_NO_ONE = _hasher.hash(secrets.token_urlsafe(16))


class Role(str, enum.Enum):
    """What an account may do."""

    RADIOLOGIST = "radiologist"
    """Reads the worklist and studies and records verdicts."""
    OPERATOR = "operator"
    """Reads the worklist, studies and the operations page; records no verdict."""
    ADMIN = "admin"
    """Everything, accounts included (the shared API token is one)."""


class AccountError(ValueError):
    """An account operation that cannot be done; the message says why."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise AccountError(f"{name!r} is not an account name: 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def _find(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise AccountError(f"no account named {name!r}")
    return account


def add_account(session: Session, *, name: str, role: Role | str) -> tuple[Account, str]:
    """A new account and its personal API token (returned once, stored only as its hash)."""
    role = Role(role)
    if session.scalar(select(Account.id).where(Account.name == check_name(name))) is not None:
        raise AccountError(f"an account named {name!r} exists already")
    token = secrets.token_urlsafe(32)
    account = Account(name=name, role=role.value, token_sha256=token_digest(token), created_at=utcnow())
    session.add(account)
    session.flush()
    return account, token


def new_token(session: Session, *, name: str) -> str:
    """A new personal API token for ``name``; the previous one stops working."""
    account = _find(session, name)
    token = secrets.token_urlsafe(32)
    account.token_sha256 = token_digest(token)
    return token


def disable_account(session: Session, *, name: str) -> Account:
    account = _find(session, name)
    if account.disabled_at is None:
        account.disabled_at = utcnow()
    return account


def set_password(session: Session, *, name: str, password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AccountError(f"a password must have {MIN_PASSWORD}-{MAX_PASSWORD} characters, got {len(password)}")
    _find(session, name).password_hash = _hasher.hash(password)


def account_for_token(session: Session, *, token: str) -> Account | None:
    """The enabled account whose personal token is ``token``, or None."""
    return session.scalar(select(Account).where(Account.token_sha256 == token_digest(token),
                                                Account.disabled_at.is_(None)))


def account_for_password(session: Session, *, name: str, password: str) -> Account | None:
    """The enabled account ``name`` if ``password`` is its password, or None (same cost either way)."""
    account = session.scalar(select(Account).where(Account.name == name)) if NAME_PATTERN.match(name) else None
    stored = account.password_hash if account is not None and account.password_hash else _NO_ONE
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if account is None or account.password_hash is None or account.disabled_at is not None:
        return None
    if _hasher.check_needs_rehash(stored):
        account.password_hash = _hasher.hash(password)
    return account


def enabled_account(session: Session, *, name: str) -> Account | None:
    return session.scalar(select(Account).where(Account.name == name, Account.disabled_at.is_(None)))


def list_accounts(session: Session) -> list[dict[str, Any]]:
    """Every account, by name: its role, whether it has a password, when made and disabled."""
    return [{"name": a.name, "role": a.role, "has_password": a.password_hash is not None,
             "created_at": a.created_at.isoformat(),
             "disabled_at": a.disabled_at.isoformat() if a.disabled_at else None}
            for a in session.scalars(select(Account).order_by(Account.name))]
