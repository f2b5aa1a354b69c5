"""Prometheus metrics of the HTTP API: pipeline counts read from the database and
queue depths read from a Redis broker, at each scrape."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.orm import Session, sessionmaker

from db.metrics import pipeline_snapshot
from db.models import InstanceState
from worker.celery_app import ALL_QUEUES

log = logging.getLogger(__name__)

#: upper bounds (seconds) of the screening latency histogram
LATENCY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
#: instance states still in flight, one gauge each
IN_FLIGHT_STATES = (InstanceState.RECEIVED, InstanceState.QUEUED, InstanceState.PREPROCESSED)


def broker_client(broker_url: str) -> redis.Redis | None:
    """A client for the broker's queue lengths when the broker is Redis (none for memory:// and others)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    return redis.Redis.from_url(broker_url, socket_timeout=2.0, socket_connect_timeout=2.0)


#: kombu's Redis transport keeps a queue's prioritised messages in "<queue>\x06\x16<priority>" lists
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class PipelineCollector(Collector):
    """Prometheus metrics read at each scrape: counts from the database, queue lengths from Redis."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session]], broker: redis.Redis | None) -> None:
        self._sessions = sessions
        self._broker = broker

    def collect(self) -> list[Metric]:
        with self._sessions()() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})  # one consistent view
            snapshot = pipeline_snapshot(session, latency_buckets=LATENCY_BUCKETS)
        metrics: list[Metric] = [
            CounterMetricFamily("pneumoscreen_instances_received_total", "Instances received, whatever their state",
                                value=snapshot.received),
            CounterMetricFamily("pneumoscreen_instances_screened_total", "Instances screened (PREDICTED)",
                                value=snapshot.screened),
            CounterMetricFamily("pneumoscreen_instances_flagged_total",
                                "Instances whose latest prediction is flagged", value=snapshot.flagged),
            CounterMetricFamily("pneumoscreen_instances_failed_total", "Instances that could not be screened",
                                value=snapshot.failed),
            CounterMetricFamily("pneumoscreen_instances_skipped_total", "Instances not eligible for screening",
                                value=snapshot.skipped),
        ]
        predictions = CounterMetricFamily("pneumoscreen_predictions_total", "Predictions stored, by model version",
                                          labels=["model_version"])
        for model_version, count in snapshot.predictions_by_model_version.items():
            predictions.add_metric([model_version], count)
        in_flight = GaugeMetricFamily("pneumoscreen_instances", "Instances in flight, by state", labels=["state"])
        for state in IN_FLIGHT_STATES:
            in_flight.add_metric([state.value], snapshot.instances_by_state[state.value])
        deliveries = GaugeMetricFamily("pneumoscreen_result_deliveries", "Result reports to the PACS, by state",
                                       labels=["state"])
        for state, count in snapshot.deliveries_by_state.items():
            deliveries.add_metric([state], count)
        latency = snapshot.latency
        histogram = HistogramMetricFamily(
            "pneumoscreen_screening_latency_seconds", "Seconds from an instance being queued to its prediction",
            buckets=[*((floatToGoString(bound), count) for bound, count in latency.buckets), ("+Inf", latency.count)],
            sum_value=latency.sum,
        )
        metrics += [predictions, in_flight, deliveries, histogram]
        depth = self._queue_depth()
        if depth is not None:
            metrics.append(depth)
        return metrics

    def _queue_depth(self) -> GaugeMetricFamily | None:
        depths = queue_depths(self._broker)
        if depths is None:
            return None
        depth = GaugeMetricFamily("pneumoscreen_queue_depth", "Messages waiting in the broker, by queue",
                                  labels=["queue"])
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        return depth


def queue_depths(broker: redis.Redis | None) -> dict[str, int] | None:
    """Messages waiting in each queue (every priority), or None without a Redis broker or when it does not answer."""
    if broker is None:
        return None
    try:
        with broker.pipeline(transaction=False) as pipe:
            for queue in ALL_QUEUES:
                for suffix in _PRIORITY_SUFFIXES:
                    pipe.llen(queue + suffix)
            lengths = pipe.execute()
    except redis.RedisError as exc:
        log.warning("queue depth left out of the metrics: the broker did not answer (%s)", exc)
        return None
    n = len(_PRIORITY_SUFFIXES)
    return {queue: sum(lengths[i * n:(i + 1) * n]) for i, queue in enumerate(ALL_QUEUES)}
