"""What the drift check reads: each screened film's input statistics, recorded when it was
prepared, and the latest films a model screened. Session in, caller commits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import InstanceInput, Prediction

MAX_MANUFACTURER, MAX_MODALITY = 64, 16


def record_inputs(session: Session, *, inputs: Mapping[int, Mapping[str, Any]]) -> None:
    """Keep ``{instance id: {"rows", "columns", "brightness", "manufacturer", "modality"}}``; a film
    prepared again (a rescreen) keeps its latest."""
    for instance_id, values in inputs.items():
        manufacturer, modality = values.get("manufacturer"), values.get("modality")
        session.merge(InstanceInput(
            instance_id=instance_id, rows=int(values["rows"]), columns=int(values["columns"]),
            brightness=float(values["brightness"]),
            manufacturer=str(manufacturer)[:MAX_MANUFACTURER] if manufacturer else None,
            modality=str(modality)[:MAX_MODALITY] if modality else None))


def recent_screened(session: Session, *, model_version: str, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` films ``model_version`` answered last, newest first: probability, flagged, and the
    input statistics when they were recorded (None for films prepared before they were)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rows = session.execute(
        select(Prediction.probability, Prediction.flagged, InstanceInput)
        .outerjoin(InstanceInput, InstanceInput.instance_id == Prediction.instance_id)
        .where(Prediction.model_version == model_version)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(limit)).all()
    return [{"probability": float(p), "flagged": bool(f),
             "input": None if i is None else {"rows": i.rows, "columns": i.columns, "brightness": i.brightness,
                                              "manufacturer": i.manufacturer, "modality": i.modality}}
            for p, f, i in rows]
