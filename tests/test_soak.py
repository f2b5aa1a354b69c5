"""The chaos soak's short run (the long one is `bench/soak.py`): 1,000 instances over 4
associations into the production topology while each process kind is killed with SIGKILL three
times, Redis is restarted twice and PostgreSQL once; every instance answered with success ends
PREDICTED exactly once, each study's report is sent under one UID per content, and the spool and
the database agree."""

from __future__ import annotations

import pytest

from tests.helpers.soak import KINDS, Soak

pytestmark = pytest.mark.slow  # six processes, two private servers, 1,000 films, 18 faults


def test_a_short_soak_under_repeated_faults_loses_nothing(tmp_path):
    soak = Soak(tmp_path, count=1000, seed=23, kills_per_kind=3, reconcile_after_seconds=30, drain_seconds=420)
    report = soak.run()
    summary = {k: v for k, v in report.as_dict().items() if k != "faults"}
    assert report.faults_injected == {**{f"kill {kind}": 3 for kind in KINDS}, "restart redis": 2,
                                      "restart postgresql": 1}, summary
    assert report.acknowledged == 1000, summary
    assert (report.lost, report.duplicated, report.stuck, report.failed_or_skipped) == (0, 0, 0, 0), summary
    assert report.states == {"PREDICTED": 1000}, summary
    assert report.reports_conflicting == 0 and report.studies_without_full_report == 0, summary
    assert report.reports_distinct >= report.studies, summary
    assert report.deliveries == {"SENT": report.studies}, summary
    assert (report.spool_files, report.orphan_files, report.rows_without_file) == (1000, 0, 0), summary
    for kind in ("listener", "receiver", "beat"):
        assert report.rss_mb[kind]["peak"] < report.rss_mb[kind]["first"] + 150, summary
