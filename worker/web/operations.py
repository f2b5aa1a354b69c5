"""What the operations page shows about the site loop: the site's labelled sample
(``worker.site_sample``) and the drift report (``worker.drift``), each computed from stored rows
only (no model is run) and kept for a minute, since both read many rows (the last N films, every
verdict) and the sample's AUC interval is a bootstrap; and the drift plot's PNG.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.drift import recent_screened
from model.artifact import DEFAULT_MODEL_DIR, ModelArtifactError, ModelCard
from worker.drift import drift_report, reference_for
from worker.settings import Settings
from worker.site_sample import site_sample, target_sensitivity
from worker.web.renders import drift_plot_png

log = logging.getLogger(__name__)

#: How long a computed sample, drift report or plot is shown before it is computed again.
KEEP_SECONDS = 60.0


class TimedCache:
    """Values by key, each kept for ``seconds`` after it was computed; at most ``entries`` keys."""

    def __init__(self, seconds: float = KEEP_SECONDS, entries: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds, self._entries, self._clock = seconds, entries, clock
        self._items: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is not None and self._clock() - found[0] < self._seconds:
                return found[1]
        value = compute()
        with self._lock:
            self._items[key] = (self._clock(), value)
            self._items.move_to_end(key)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)
        return value


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def model_dir_of(settings: Settings) -> Path:
    return Path(settings.model_dir or DEFAULT_MODEL_DIR)


def site_view(session: Session, cache: TimedCache, *, settings: Settings, card: ModelCard) -> dict:
    """``worker.site_sample.site_sample`` at ``PNEUMOSCREEN_SITE_SENSITIVITY`` (default: the card's), kept a minute."""
    sensitivity = target_sensitivity(card, settings.site_sensitivity)
    return cache.get_or_compute(("site", card.version, card.threshold, sensitivity),
                                lambda: {**site_sample(session, card=card, sensitivity=sensitivity),
                                         "computed_at": _now()})


def drift_view(session: Session, cache: TimedCache, *, settings: Settings, card: ModelCard) -> dict:
    """``worker.drift.drift_report`` of the last ``PNEUMOSCREEN_DRIFT_WINDOW`` films, kept a minute; ``{"error"}``
    when the model keeps no reference to compare with."""
    model_dir = model_dir_of(settings)

    def compute() -> dict:
        try:
            report = drift_report(session, model_dir=model_dir, card=card, window=settings.drift_window)
        except (ModelArtifactError, FileNotFoundError, ValueError) as exc:
            log.warning("no drift report on the operations page: %s", exc)
            return {"error": str(exc)}
        return {**report, "computed_at": _now()}

    return cache.get_or_compute(("drift", str(model_dir), card.version, settings.drift_window), compute)


def drift_plot(session: Session, cache: TimedCache, *, settings: Settings, card: ModelCard) -> bytes:
    """The score histogram of the drift window against the model's held-out scores, as a PNG, kept a minute.
    Raises ``FileNotFoundError`` when the model keeps no held-out scores."""
    model_dir = model_dir_of(settings)

    def compute() -> bytes:
        reference = reference_for(model_dir, card)
        rows = recent_screened(session, model_version=card.version, limit=settings.drift_window)
        return drift_plot_png(reference.scores, [r["probability"] for r in rows], threshold=card.threshold,
                              version=card.version)

    return cache.get_or_compute(("drift.png", str(model_dir), card.version, settings.drift_window), compute)
