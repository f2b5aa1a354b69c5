"""Whatever dies, every instance answered with success ends PREDICTED exactly once.

The production topology as separate processes: listener, preprocess worker,
inference worker and beat (reconciling every second), over a private Redis
and a private PostgreSQL that the tests kill and restart.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers.processes import wait_for_port, wait_until
from tests.helpers.topology import Topology

pytestmark = pytest.mark.slow
COUNT = 40


@pytest.fixture
def topology(tmp_path):
    top = Topology(tmp_path)
    yield top
    top.close()


def _succeeded(statuses: dict[str, int]) -> set[str]:
    return {uid for uid, status in statuses.items() if status == 0}


def _wait_for_some_predicted(topology: Topology, n: int = 1) -> None:
    """Until the first results are in, while most are still in flight (else the fault hits nothing)."""
    wait_until(lambda: topology.counts().get("PREDICTED", 0) >= n, timeout=90, interval=0.1, what=f"{n} PREDICTED")
    assert topology.counts().get("PREDICTED", 0) < COUNT, "everything finished before the fault"


@pytest.mark.parametrize("victim", ["inference", "preprocess"])
def test_kill_9_of_a_worker_mid_flight_loses_nothing(topology, victim):
    statuses = topology.send(COUNT)
    assert len(_succeeded(statuses)) == COUNT
    _wait_for_some_predicted(topology)
    topology.kill(victim)
    time.sleep(2)
    topology.start(victim)
    topology.assert_exactly_once(_succeeded(statuses))


@pytest.mark.parametrize("during", ["preprocessing", "inference"])
def test_redis_restart_with_studies_in_flight_loses_nothing(topology, during):
    statuses = topology.send(COUNT)
    if during == "preprocessing":  # the preprocess worker is handing images on to the inference queue
        wait_until(lambda: topology.counts().get("PREPROCESSED", 0) >= 1, timeout=90, interval=0.01,
                   what="1 PREPROCESSED")
    else:
        _wait_for_some_predicted(topology)
    topology.redis.stop()  # no persistence: every queued message is gone
    time.sleep(3)
    topology.redis.start()
    topology.assert_exactly_once(_succeeded(statuses))


def test_postgresql_down_for_10_seconds_while_results_are_written_loses_nothing(topology):
    statuses = topology.send(COUNT)
    _wait_for_some_predicted(topology)
    topology.postgres.stop()
    time.sleep(10)
    topology.postgres.start()
    topology.assert_exactly_once(_succeeded(statuses))


def test_kill_9_of_the_listener_mid_association_keeps_every_acknowledged_instance(topology):
    killed = threading.Event()

    def kill_after_five(successes: int) -> None:
        if successes == 5 and not killed.is_set():
            killed.set()
            topology.kill("listener")

    statuses = topology.send(COUNT, on_success=kill_after_five)
    assert killed.is_set()
    succeeded = _succeeded(statuses)
    assert 5 <= len(succeeded) < COUNT
    topology.start("listener")
    wait_for_port(topology.port, topology.processes["listener"].proc)
    topology.assert_exactly_once(succeeded)
