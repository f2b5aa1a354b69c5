"""The pages' queries, in process (FastAPI's TestClient over a real SQLite database): the worklist
page costs the same number of SQL statements for 5 rows as for 50, and says why an image was not
screened."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from db.models import InstanceState
from db.queries import set_state
from tests.helpers.records import answer, receive
from worker import runtime
from worker.api.app import create_app
from worker.settings import Settings

TOKEN = "5d0c2a8e4f6b1d3a9c7e5f2b4d6a8c0e"


@pytest.fixture
def pages(tmp_path, database_url):
    """A signed-in client of the pages over ``database_url`` and its session factory."""
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url, api_token=TOKEN))
    with TestClient(app, follow_redirects=False) as client:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/web/login").text).group(1)
        signed = client.post("/web/login", data={"token": TOKEN, "csrf_token": csrf, "next": "/web/worklist"})
        assert signed.status_code == 303, signed.text
        yield client, runtime.sessions()


def _fill(sessions, first: int, last: int) -> None:
    """Studies ``first`` .. ``last - 1``: the odd ones screened, the even ones skipped with a reason
    of their own (so the page looks up the reasons of half its rows)."""
    with sessions.begin() as s:
        for n in range(first, last):
            instance_id, _ = receive(s, f"1.2.3.{n}", f"1.2.3.{n}.1")
            if n % 2:
                answer(s, [(instance_id, 0.9 if n % 4 == 1 else 0.1)])
            else:
                set_state(s, instance_id=instance_id, state=InstanceState.SKIPPED, reason=f"lateral view {n}.")


def _statements(client: TestClient, path: str) -> tuple[int, str]:
    count = 0

    def counted(*_args) -> None:
        nonlocal count
        count += 1

    event.listen(Engine, "before_cursor_execute", counted)
    try:
        answer_ = client.get(path)
    finally:
        event.remove(Engine, "before_cursor_execute", counted)
    assert answer_.status_code == 200, answer_.text
    return count, answer_.text


def test_worklist_page_runs_as_many_queries_for_50_rows_as_for_5(pages):
    client, sessions = pages
    _fill(sessions, 0, 5)
    five, page = _statements(client, "/web/worklist")
    assert page.count("lateral view") == 3
    _fill(sessions, 5, 50)
    fifty, page = _statements(client, "/web/worklist")
    assert page.count("lateral view") == 25
    assert page.count('href="/web/studies/') >= 50
    assert fifty == five


def test_worklist_page_names_each_reason_once_per_study(pages):
    client, sessions = pages
    with sessions.begin() as s:
        for sop in ("1.2.9.1", "1.2.9.2"):
            instance_id, _ = receive(s, "1.2.9", sop)
            set_state(s, instance_id=instance_id, state=InstanceState.SKIPPED, reason="lateral view")
    _, page = _statements(client, "/web/worklist")
    assert page.count("SKIPPED: lateral view") == 1
