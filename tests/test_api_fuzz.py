"""Hostile input at the HTTP API and the pages of a running `pneumoscreen api`: every parameter
and path segment with SQL fragments, huge and negative numbers, unicode and control characters,
path tricks and long strings; tokens and session cookies of every wrong shape. No answer is a
server error or shows a stack trace or an internal path, and the database is unchanged."""

from __future__ import annotations

import random
import re
import socket

import httpx
import pytest
from sqlalchemy import create_engine, text

from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from tests.helpers.processes import Process, cli_env, free_port, wait_for_port
from tests.helpers.records import answer, receive

pytestmark = pytest.mark.slow  # a pneumoscreen api process

TOKEN = "5b2d9e8f1a4c7e0b3d6f9a2c5e8b1d4f"
STUDY, SOP = "1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.1.1.1"
HOSTILE = [
    "' OR 1=1 --", "1; DROP TABLE instance; --", "\" OR \"\"=\"", "%' UNION SELECT * FROM audit_log --",
    "9" * 400, "-1", "-99999999999999999999", "1e309", "NaN", "0x7fffffff", "2147483648",
    "\u202e\u0000\u0007", "ümlaut·日本語·🙂", "\ud7ff", "\x1b[31m",
    "../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "..\\..\\windows\\win.ini", "/etc/shadow",
    "%00", "%252e%252e%252f", "<script>alert(1)</script>", "{{7*7}}", "${jndi:ldap://x}",
    "x" * 10_000, "", " ", "true", "false", "2026-13-45", "2026-11-01T25:61", "SCREENED", "null",
]
LEAKS = re.compile(r"Traceback|site-packages|/work/|/tmp/|\.py\b|sqlalchemy|psycopg|File \"")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-fuzz")
    url = f"sqlite:///{tmp / 'data' / 'pneumoscreen.db'}"
    (tmp / "data").mkdir()
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:
        instance_id, _ = receive(s, STUDY, SOP, "FUZZ1")
        answer(s, [(instance_id, 0.9)])
    engine.dispose()
    port = free_port()
    process = Process(["api"], cli_env(data_dir=tmp / "data", api_token=TOKEN, api_port=port), tmp / "api.log")
    try:
        wait_for_port(port, process.proc)
        yield f"http://127.0.0.1:{port}", url, process
    finally:
        process.stop()


def _counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return {table: c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                    for table in ("study", "series", "instance", "prediction", "model_version")}
    finally:
        engine.dispose()


def _check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    assert not LEAKS.search(response.text), (what, response.text[:300])


def _signed_in(client: httpx.Client) -> None:
    form = client.get("/web/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    assert client.post("/web/login", data={"token": TOKEN, "csrf_token": csrf}).status_code == 303


def test_every_parameter_and_path_with_hostile_values(api):
    base, url, process = api
    before = _counts(url)
    rng = random.Random(19)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    tried = 0
    with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as client:
        _signed_in(client)
        for value in HOSTILE:
            other = rng.choice(HOSTILE)
            requests = [
                ("/worklist", {"flagged_only": value, "since": other, "until": value, "state": value,
                               "limit": value, "offset": other}),
                ("/instances", {"state": value, "study": value, "limit": other, "offset": value}),
                (f"/studies/{value}", {}),
                ("/web/worklist", {"flagged_only": value, "state": value, "since": value, "until": other,
                                   "page": value}),
                (f"/web/studies/{value}", {}),
                (f"/web/images/{value}/film.png", {}),
                (f"/web/images/{SOP}/{value}.png", {}),
                ("/web/login", {"next": value}),
            ]
            for path, params in requests:
                try:
                    response = client.get(path, params=params, headers=headers)
                except httpx.InvalidURL:
                    continue  # not even sendable: no server would see it
                _check(response, f"GET {path} {params}")
                tried += 1
            login = client.post("/web/login", data={"token": value, "csrf_token": value, "next": other})
            _check(login, f"POST /web/login {value!r}")
            tried += 1
    assert tried > 250
    assert _counts(url) == before
    assert process.proc.poll() is None
    assert "Traceback" not in process.log()


@pytest.mark.parametrize("authorization", [
    "", "Bearer", "Bearer ", "bearer" + TOKEN, "Basic " + TOKEN, "Bearer " + TOKEN[:-1],
    "Bearer " + TOKEN + "x", "Bearer " + TOKEN.upper(), "Bearer " + "A" * 8000, "Token " + TOKEN,
    "Bearer " + TOKEN + " extra",
])
def test_tokens_of_every_wrong_shape_are_refused_without_a_trace(api, authorization):
    base, _, _ = api
    port = int(base.rsplit(":", 1)[1])
    for path in ("/worklist", "/instances", f"/studies/{STUDY}", "/metrics"):
        status, body = _raw_get(port, path, authorization)  # as sent, whitespace and all
        assert status in (400, 401, 431), (path, authorization[:40], status)
        assert not LEAKS.search(body) and "FUZZ1" not in body, (path, body[:300])


def _raw_get(port: int, path: str, authorization: str) -> tuple[int, str]:
    """A GET written byte for byte (a client library would refuse some of these headers)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\n"
               "Connection: close\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("utf-8", "replace")


@pytest.mark.parametrize("cookie", ["", "x", "e30", "e30.AAAA.BBBB", "eyJhIjoid2ViOngiLCJjIjoiY3NyZiJ9.x.y",
                                    "A" * 4000, "../../etc/passwd", "%C3%BC"])
def test_session_cookies_of_every_wrong_shape_send_to_sign_in(api, cookie):
    base, _, _ = api
    with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as client:
        client.cookies.set("pneumoscreen_session", cookie)
        for path in ("/web/worklist", f"/web/studies/{STUDY}", "/web/operations", f"/web/images/{SOP}/film.png"):
            response = client.get(path)
            assert response.status_code == 303 and response.headers["location"].startswith("/web/login"), path
