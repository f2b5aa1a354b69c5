"""The reading queries the rescreen and the pages ask, on SQLite and PostgreSQL: how many
instances are still open, how far a set of studies has come, which studies are known, where an
instance's file is."""

from __future__ import annotations

import pytest

from db.models import InstanceState
from db.queries import set_state
from db.results import instance_path, known_studies, open_instance_count, studies_progress
from tests.helpers.records import answer, receive


@pytest.fixture
def database_url(any_database_url):
    return any_database_url


def test_open_counts_progress_and_known_studies(sessions):
    with sessions.begin() as s:
        screened, _ = receive(s, "1.1", "1.1.1", path="/spool/1.1.1.dcm")
        skipped, _ = receive(s, "1.1", "1.1.2")
        waiting, _ = receive(s, "1.2", "1.2.1")
        answer(s, [(screened, 0.3)])
        set_state(s, instance_id=skipped, state=InstanceState.SKIPPED, reason="lateral")
    with sessions() as s:
        assert open_instance_count(s, instance_ids=[screened, skipped, waiting]) == 1
        assert open_instance_count(s, instance_ids=[]) == 0
        assert studies_progress(s, study_instance_uids=["1.1"]) == (2, 2)
        assert studies_progress(s, study_instance_uids=["1.1", "1.2", "9.9"]) == (3, 2)
        assert known_studies(s, study_instance_uids=["1.2", "9.9"]) == {"1.2"}
        assert known_studies(s, study_instance_uids=[]) == set()
        assert instance_path(s, sop_instance_uid="1.1.1") == "/spool/1.1.1.dcm"
        assert instance_path(s, sop_instance_uid="9.9.9") is None
