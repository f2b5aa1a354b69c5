"""The network fuzzer's short run against a `pneumoscreen listen` process (the long one is
`bench/fuzz.py network`): every case tried, the listener up, C-ECHO answered throughout, the
well-behaved sender's films all recorded, memory bounded, nothing half-received left behind."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select

from db.models import Instance
from tests.helpers.network_fuzz import CASES, NetworkFuzzer
from tests.helpers.processes import REDIS_URL, flushed_redis, listening, wait_until

pytestmark = pytest.mark.slow  # a listener process, a few hundred hostile connections


def test_a_short_network_fuzz_leaves_the_listener_up_and_loses_nothing(tmp_path):
    with flushed_redis(REDIS_URL) as redis_url, listening(tmp_path, redis_url, artim_timeout=2) as (port, listener,
                                                                                                 data_dir):
        report = NetworkFuzzer(port, listener.proc.pid, seed=21).run(count=10 * len(CASES), seconds=90)
        assert listener.proc.poll() is None, listener.log()[-3000:]
        assert set(report.cases) == set(CASES) and sum(report.cases.values()) == 10 * len(CASES)
        assert report.echo_failures == 0 and report.echoes > 10, report.as_dict()
        assert report.store_failures == [] and len(report.stored) > 5, report.as_dict()
        assert report.peak_rss_mb < report.start_rss_mb + 150, report.as_dict()
        engine = create_engine(f"sqlite:///{data_dir / 'pneumoscreen.db'}")
        with engine.connect() as c:
            recorded = set(c.scalars(select(Instance.SOPInstanceUID)))
        engine.dispose()
        assert set(report.stored) <= recorded
        wait_until(lambda: not list((data_dir / "incoming").iterdir()), timeout=10, what="incoming/ empty")
        assert not list((data_dir / "spool").rglob(".incoming-*"))
        log = listener.log()
        assert "Traceback" not in log, log[log.find("Traceback") - 300:][:4000]
