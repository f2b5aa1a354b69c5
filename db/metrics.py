"""Counts for monitoring, read from the database: it is the source of truth, so
the numbers are the same whichever listener or worker process did the work.

Session in, nothing written. Run ``pipeline_snapshot`` in one transaction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Float, Numeric, case, cast, extract, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.deliveries import delivery_counts
from db.models import DeliveryState, Instance, InstanceState, Prediction
from db.results import _latest_prediction_ids


@dataclass(frozen=True)
class LatencyHistogram:
    """Screening latency (queued -> prediction stored) of every measurable prediction, in seconds."""

    #: (upper bound, predictions at or below it), ascending; the +Inf bucket is ``count``
    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass(frozen=True)
class PipelineSnapshot:
    """What the pipeline has received and done, at one moment."""

    #: every ``InstanceState`` value, zeros included
    instances_by_state: Mapping[str, int]
    #: instances whose latest prediction is flagged (as the worklist shows them)
    flagged: int
    #: model version -> predictions it made
    predictions_by_model_version: Mapping[str, int]
    #: every ``DeliveryState`` value, zeros included
    deliveries_by_state: Mapping[str, int]
    latency: LatencyHistogram

    @property
    def received(self) -> int:
        """Every instance ever recorded, whatever its state."""
        return sum(self.instances_by_state.values())

    @property
    def screened(self) -> int:
        return self.instances_by_state[InstanceState.PREDICTED.value]

    @property
    def failed(self) -> int:
        return self.instances_by_state[InstanceState.FAILED.value]

    @property
    def skipped(self) -> int:
        return self.instances_by_state[InstanceState.SKIPPED.value]


def _seconds_between(session: Session, later, earlier) -> ColumnElement[float]:
    """``later - earlier`` in seconds, rounded to the millisecond (SQLite's julianday is exact to a few
    microseconds only), the same number on SQLite and PostgreSQL."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        seconds = (func.julianday(later) - func.julianday(earlier)) * 86400.0
        return cast(func.round(seconds, 3), Float)
    if dialect == "postgresql":
        return cast(func.round(cast(extract("epoch", later - earlier), Numeric), 3), Float)
    raise NotImplementedError(f"database {dialect!r} is not supported (SQLite or PostgreSQL)")


def _check_buckets(latency_buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in latency_buckets)
    if any(not math.isfinite(b) or b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"latency_buckets must be finite positive seconds in ascending order, got {latency_buckets!r}")
    return bounds


def latency_histogram(session: Session, *, latency_buckets: Sequence[float]) -> LatencyHistogram:
    """Seconds from each prediction's instance being queued to the prediction being stored.

    Predictions of instances never queued, and older predictions of an instance
    queued again since (a rescreen restarts its clock), have no latency to measure
    and are left out.
    """
    bounds = _check_buckets(latency_buckets)
    measured = (
        select(_seconds_between(session, Prediction.created_at, Instance.queued_at).label("seconds"))
        .join(Instance, Prediction.instance_id == Instance.id)
        .where(Instance.queued_at.is_not(None))
        .subquery()
    )
    seconds = measured.c.seconds
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(seconds), 0.0),
               *[func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in bounds])
        .where(seconds >= 0)
    ).one()
    count, total, *cumulative = row
    return LatencyHistogram(buckets=tuple(zip(bounds, (int(c) for c in cumulative))), count=int(count),
                            sum=float(total))


def pipeline_snapshot(session: Session, *, latency_buckets: Sequence[float]) -> PipelineSnapshot:
    """Instances by state, flagged instances, predictions by model version, result
    deliveries by state and the screening latency histogram."""
    by_state = {state.value: 0 for state in InstanceState}
    for state, count in session.execute(select(Instance.state, func.count()).group_by(Instance.state)):
        by_state[InstanceState(state).value] = count
    latest = _latest_prediction_ids()
    flagged = session.scalar(
        select(func.count()).select_from(latest)
        .join(Prediction, Prediction.id == latest.c.prediction_id)
        .where(Prediction.flagged)
    )
    by_model = dict(session.execute(
        select(Prediction.model_version, func.count()).group_by(Prediction.model_version)
        .order_by(Prediction.model_version)
    ).all())
    deliveries = {state.value: 0 for state in DeliveryState}
    deliveries.update(delivery_counts(session))
    return PipelineSnapshot(
        instances_by_state=by_state, flagged=int(flagged or 0), predictions_by_model_version=by_model,
        deliveries_by_state=deliveries, latency=latency_histogram(session, latency_buckets=latency_buckets),
    )
