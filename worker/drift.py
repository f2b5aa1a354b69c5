"""The drift report of this installation: the last films the configured model screened (from the
database) against the model's reference (beside its weights), by ``model.drift``. One function
for `pneumoscreen drift`, the operations page and the Prometheus gauges."""

from __future__ import annotations

import functools
from pathlib import Path

from sqlalchemy.orm import Session

from db.drift import recent_screened
from model.artifact import ModelCard
from model.drift import FilmInput, Reference, compare


@functools.lru_cache(maxsize=4)
def _reference(model_dir: str, threshold: float, calibration: tuple, mtime: float) -> Reference:
    return Reference.from_model_dir(Path(model_dir), threshold, dict(calibration))


def reference_for(model_dir: Path, card: ModelCard) -> Reference:
    """The model's reference, read once per process (again when its files change)."""
    model_dir = Path(model_dir)
    stamps = [p.stat().st_mtime for p in model_dir.iterdir() if p.name.endswith((".npz", ".json"))]
    calibration = (card.validation or {}).get("calibration") or {}
    return _reference(str(model_dir.resolve()), card.threshold,
                      tuple(sorted((k, v) for k, v in calibration.items() if k in ("slope", "intercept"))),
                      max(stamps, default=0.0))


def drift_report(session: Session, *, model_dir: Path, card: ModelCard, window: int) -> dict:
    """``model.drift.compare`` of the last ``window`` films ``card``'s model screened, with the model named."""
    rows = recent_screened(session, model_version=card.version, limit=window)
    inputs = [FilmInput(**r["input"]) for r in rows if r["input"] is not None]
    report = compare(reference_for(model_dir, card), probabilities=[r["probability"] for r in rows],
                     flagged=[r["flagged"] for r in rows], inputs=inputs)
    return {**report, "model_version": card.version, "requested_window": window}
