"""Prometheus gauges of the drift check (``worker.drift``), computed at each scrape from the last
``PNEUMOSCREEN_DRIFT_WINDOW`` films the configured model screened: one gauge per statistic."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


class DriftCollector(Collector):
    def __init__(self, sessions: Callable[[], sessionmaker[Session]], model_dir: Path | None, window: int) -> None:
        self._sessions, self._model_dir, self._window = sessions, model_dir, window

    def collect(self) -> list[Metric]:
        from model.artifact import DEFAULT_MODEL_DIR, ModelArtifactError, read_card
        from worker.drift import drift_report

        model_dir = Path(self._model_dir or DEFAULT_MODEL_DIR)
        try:
            card = read_card(model_dir, verify=False)
            with self._sessions()() as session:
                report = drift_report(session, model_dir=model_dir, card=card, window=self._window)
        except (ModelArtifactError, FileNotFoundError, ValueError) as exc:
            log.warning("no drift metrics: %s", exc)
            return []
        window = GaugeMetricFamily("pneumoscreen_drift_window_films", "Films in the drift window", value=report["window"])
        drifted = GaugeMetricFamily("pneumoscreen_drift_drifted", "1 when any statistic drifted from the model's "
                                    "reference", value=int(report["drifted"]))
        statistic = GaugeMetricFamily("pneumoscreen_drift_statistic", "Two-sample KS D of the window against the "
                                      "reference (scores, aspect, brightness, megapixels); the flag rate's change",
                                      labels=["statistic"])
        p_value = GaugeMetricFamily("pneumoscreen_drift_p_value", "p-value of each drift statistic", labels=["statistic"])
        flag_rate = GaugeMetricFamily("pneumoscreen_drift_flag_rate", "Share of flagged films", labels=["set"])
        if "flag_rate" in report:
            fr = report["flag_rate"]
            flag_rate.add_metric(["window"], fr["window"])
            flag_rate.add_metric(["reference"], fr["reference"])
            statistic.add_metric(["flag_rate"], abs(fr["window"] - fr["reference"]))
            p_value.add_metric(["flag_rate"], fr["p_value"])
            for name, figures in (("scores", report["scores"]), *report["inputs"].items()):
                if "statistic" in figures:
                    statistic.add_metric([name], figures["statistic"])
                    p_value.add_metric([name], figures["p_value"])
                elif "largest_change" in figures:
                    statistic.add_metric([f"{name}_mix"], figures["largest_change"])
        return [window, drifted, flag_rate, statistic, p_value]
