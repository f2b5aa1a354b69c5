"""Named accounts: made with `pneumoscreen users`, their tokens and passwords stored hashed, their
roles gating the API, a disabled account or a replaced token refused at once, and every request
audited under the account's name. The API runs in this process (its ASGI app) over SQLite."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.accounts import AccountError, account_for_password, account_for_token, add_account, set_password
from db.audit import recent_audit
from db.models import Account
from tests.helpers.records import receive
from worker.cli import cli
from worker.settings import Settings

SHARED_TOKEN = "7e3b1c9d5a2f4e6081a2b3c4d5e6f708"
STUDY = "1.2.826.0.1.3680043.10.31.1"


@pytest.fixture
def env(monkeypatch, tmp_path, database_url):
    monkeypatch.setenv("PNEUMOSCREEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PNEUMOSCREEN_DATABASE_URL", database_url)
    monkeypatch.setenv("PNEUMOSCREEN_API_TOKEN", SHARED_TOKEN)
    return database_url


def users(*args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(cli, ["users", *args], input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def api(env):
    from worker.api.app import create_app

    with TestClient(create_app(Settings())) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_users_add_prints_the_token_once_and_stores_only_its_hash(env, sessions):
    made = json.loads(users("add", "dr.ada", "--role", "radiologist", "--json"))
    assert made["name"] == "dr.ada" and made["role"] == "radiologist" and len(made["token"]) >= 40
    with sessions() as s:
        row = s.scalar(select(Account).where(Account.name == "dr.ada"))
        assert row.token_sha256 == hashlib.sha256(made["token"].encode()).hexdigest()
        assert made["token"] not in (row.token_sha256, row.password_hash)
    listed = json.loads(users("list", "--json"))
    assert [(a["name"], a["role"], a["has_password"], a["disabled_at"]) for a in listed] == [
        ("dr.ada", "radiologist", False, None)]
    result = CliRunner().invoke(cli, ["users", "add", "dr.ada", "--role", "operator"])
    assert result.exit_code != 0 and "exists already" in result.output
    result = CliRunner().invoke(cli, ["users", "add", "bad name", "--role", "operator"])
    assert result.exit_code != 0 and "not an account name" in result.output


def test_passwords_are_argon2_hashes_and_only_the_right_one_signs_in(env, sessions):
    users("add", "op.bo", "--role", "operator")
    users("password", "op.bo", input="correct horse battery\n")
    with sessions.begin() as s:
        assert s.scalar(select(Account.password_hash).where(Account.name == "op.bo")).startswith("$argon2id$")
        assert account_for_password(s, name="op.bo", password="correct horse battery").name == "op.bo"
        assert account_for_password(s, name="op.bo", password="correct horse batterx") is None
        assert account_for_password(s, name="nobody", password="correct horse battery") is None
        with pytest.raises(AccountError, match="12-1024 characters"):
            set_password(s, name="op.bo", password="short")
    users("disable", "op.bo")
    with sessions() as s:
        assert account_for_password(s, name="op.bo", password="correct horse battery") is None


def test_roles_gate_the_api_and_every_request_is_audited_under_its_account(api, sessions):
    with sessions.begin() as s:
        receive(s, STUDY, f"{STUDY}.1.1")
        _, reader = add_account(s, name="dr.cy", role="radiologist")
        _, operator = add_account(s, name="op.di", role="operator")
    assert api.get("/worklist", headers=bearer(reader)).status_code == 200
    assert api.get("/worklist", headers=bearer(operator)).status_code == 200
    assert api.get("/worklist").status_code == 401
    verdict = {"finding": "pneumonia"}
    assert api.post(f"/studies/{STUDY}/verdict", json=verdict, headers=bearer(operator)).status_code == 403
    assert api.post(f"/studies/{STUDY}/verdict", json=verdict, headers=bearer(reader)).status_code == 200
    assert api.post(f"/studies/{STUDY}/verdict", json=verdict).status_code == 401
    assert api.get("/accounts", headers=bearer(reader)).status_code == 403
    assert api.post("/accounts/op.di/disable", headers=bearer(reader)).status_code == 403
    listed = api.get("/accounts", headers=bearer(SHARED_TOKEN))
    assert listed.status_code == 200 and {a["name"] for a in listed.json()} == {"dr.cy", "op.di"}
    assert "token" not in listed.text and "password_hash" not in listed.text
    with sessions() as s:
        entries = [(e["actor"], e["action"], e["status"]) for e in reversed(recent_audit(s))]
    assert entries == [
        ("user:dr.cy", "GET /worklist", 200), ("user:op.di", "GET /worklist", 200),
        ("api:anonymous", "GET /worklist", 401),
        ("user:op.di", "POST /studies/{study_instance_uid}/verdict", 403),
        ("user:dr.cy", "POST /studies/{study_instance_uid}/verdict", 200),
        ("api:anonymous", "POST /studies/{study_instance_uid}/verdict", 401),
        ("user:dr.cy", "GET /accounts", 403), ("user:dr.cy", "POST /accounts/{name}/disable", 403),
        (entries[-1][0], "GET /accounts", 200),
    ]
    assert entries[-1][0].startswith("api:") and SHARED_TOKEN not in entries[-1][0]


def test_a_disabled_account_or_a_replaced_token_is_refused_at_once(api, sessions):
    with sessions.begin() as s:
        _, first = add_account(s, name="dr.ed", role="radiologist")
    assert api.get("/worklist", headers=bearer(first)).status_code == 200
    second = json.loads(users("token", "dr.ed", "--json"))["token"]
    assert api.get("/worklist", headers=bearer(first)).status_code == 401
    assert api.get("/worklist", headers=bearer(second)).status_code == 200
    assert api.post("/accounts/dr.ed/disable", headers=bearer(SHARED_TOKEN)).json()["disabled_at"]
    assert api.get("/worklist", headers=bearer(second)).status_code == 401
    with sessions() as s:
        assert account_for_token(s, token=second) is None
