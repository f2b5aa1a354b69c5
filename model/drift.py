"""Drift without labels: do the films screened lately look like the films the model was made on?

Pure statistics, numpy in, dict out. The reference is the model's own: the held-out scores kept
beside its weights (``held_out_scores.npz``) and the input statistics of its training films
(``reference_inputs.json``, :func:`input_statistics`). The window is the last N films screened.

- flag rate: the window's share of flagged films against the share of held-out scores at or
  above the threshold (an exact binomial test);
- score distribution and each continuous input statistic (frame proportions width/height,
  brightness, size in megapixels): the two-sample Kolmogorov-Smirnov statistic D and its
  p-value (``scipy.stats.ks_2samp``);
- the header's modality and manufacturer mix: the window's shares, judged only against a
  reference that has them (films without a header, such as the Kermany JPEGs, have none).

A statistic drifts when its difference is both unlikely by chance (p below ``ALPHA``, a strict
level since several statistics are tested at once) and large enough to matter (D at least
``MIN_D``, ``MIN_SCORE_D`` for the scores, a flag rate at least ``MIN_FLAG_RATE_CHANGE`` away, a category's share at least
``MIN_SHARE_CHANGE`` away): with thousands of films any difference is "significant", and with
a few dozen only a large one can be seen. Below ``MIN_WINDOW`` films nothing is judged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, ks_2samp

REFERENCE_INPUTS_FILE = "reference_inputs.json"
HELD_OUT_SCORES_FILE = "held_out_scores.npz"
ALPHA = 0.001
MIN_D = 0.15
#: The held-out scores come from the check's fold networks and the patient split's, not from the
#: served model itself, and films like the training ones, scored by it, differ from them by a KS D
#: of up to about 0.23 (samples of 80 training films); the score distribution drifts from 0.25.
MIN_SCORE_D = 0.25
MIN_FLAG_RATE_CHANGE = 0.10
MIN_SHARE_CHANGE = 0.20
MIN_WINDOW = 30
CONTINUOUS = ("aspect", "brightness", "megapixels")
CATEGORICAL = ("modality", "manufacturer")
#: Reference values kept per statistic (a sample, not every film, keeps the file small).
REFERENCE_SAMPLE = 2000


@dataclass(frozen=True)
class FilmInput:
    """What one film looked like going in (no patient data)."""

    rows: int
    columns: int
    brightness: float
    """Mean grey level (0-255) of the display image, before the shared preprocessing."""
    modality: str | None = None
    manufacturer: str | None = None

    def __post_init__(self) -> None:
        if self.rows < 1 or self.columns < 1:
            raise ValueError(f"a film has at least one row and column, got {self.rows} x {self.columns}")
        if not 0.0 <= self.brightness <= 255.0:
            raise ValueError(f"brightness is a grey level 0-255, got {self.brightness}")

    @property
    def aspect(self) -> float:
        return self.columns / self.rows

    @property
    def megapixels(self) -> float:
        return self.rows * self.columns / 1e6


def input_statistics(films: Iterable[FilmInput], *, source: str, seed: int = 1234) -> dict:
    """The reference form of ``films``: per continuous statistic a sample of at most
    ``REFERENCE_SAMPLE`` values, per header field the counts (only of films that had one)."""
    films = list(films)
    if not films:
        raise ValueError("no films to take the reference input statistics from")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(films), size=min(len(films), REFERENCE_SAMPLE), replace=False))
    out: dict = {"source": source, "films": len(films)}
    for name in CONTINUOUS:
        values = np.array([getattr(films[i], name) for i in keep], dtype=float)
        out[name] = [round(float(v), 5) for v in values]
    for name in CATEGORICAL:
        out[name] = dict(Counter(getattr(f, name) for f in films if getattr(f, name)))
    return out


def write_reference_inputs(films: Iterable[FilmInput], out_dir: Path, *, source: str) -> Path:
    """Write :func:`input_statistics` of ``films`` as ``out_dir / REFERENCE_INPUTS_FILE``."""
    path = Path(out_dir) / REFERENCE_INPUTS_FILE
    path.write_text(json.dumps(input_statistics(films, source=source)) + "\n")
    return path


@dataclass(frozen=True)
class Reference:
    """A model's reference: its held-out scores and threshold, its training films' input statistics."""

    scores: np.ndarray
    threshold: float
    inputs: Mapping | None

    @classmethod
    def from_model_dir(cls, model_dir: Path, threshold: float, calibration: Mapping | None = None) -> "Reference":
        """The files beside the weights in ``model_dir``. The held-out scores are kept as the networks
        gave them; ``calibration`` (the card's ``validation.calibration``: ``slope``, ``intercept``) is
        the Platt map the served model applies, so that they compare with served probabilities."""
        from model.operating_point import Platt

        model_dir = Path(model_dir)
        scores_path = model_dir / HELD_OUT_SCORES_FILE
        if not scores_path.is_file():
            raise FileNotFoundError(f"{scores_path} is missing: the model keeps no held-out scores to compare with")
        with np.load(scores_path) as held_out:
            scores = np.asarray(held_out["scores"], dtype=float)
        if calibration and "slope" in calibration:
            scores = Platt(float(calibration["slope"]), float(calibration["intercept"]))(scores)
        inputs_path = model_dir / REFERENCE_INPUTS_FILE
        inputs = json.loads(inputs_path.read_text()) if inputs_path.is_file() else None
        return cls(scores=scores, threshold=float(threshold), inputs=inputs)


def _ks(reference: Sequence[float], window: Sequence[float], min_d: float = MIN_D) -> dict:
    result = ks_2samp(np.asarray(reference, dtype=float), np.asarray(window, dtype=float))
    d, p = float(result.statistic), float(result.pvalue)
    return {"statistic": round(d, 4), "p_value": p, "reference_median": round(float(np.median(reference)), 4),
            "window_median": round(float(np.median(window)), 4), "drifted": bool(p < ALPHA and d >= min_d)}


def _flag_rate(reference: Reference, flagged: Sequence[bool]) -> dict:
    expected = float(np.mean(reference.scores >= reference.threshold))
    k, n = int(np.sum(flagged)), len(flagged)
    p = float(binomtest(k, n, expected).pvalue)
    return {"reference": round(expected, 4), "window": round(k / n, 4), "p_value": p,
            "drifted": bool(p < ALPHA and abs(k / n - expected) >= MIN_FLAG_RATE_CHANGE)}


def _mix(reference_counts: Mapping[str, int] | None, values: Sequence[str | None]) -> dict:
    window = Counter(v or "unknown" for v in values)
    n = sum(window.values())
    shares = {k: round(c / n, 4) for k, c in window.most_common()}
    if not reference_counts:
        return {"window": shares, "reference": None, "drifted": False,
                "note": "not judged: the reference films had no header"}
    total = sum(reference_counts.values())
    ref = {k: c / total for k, c in reference_counts.items()}
    change = max(abs(shares.get(k, 0.0) - ref.get(k, 0.0)) for k in set(shares) | set(ref))
    return {"window": shares, "reference": {k: round(v, 4) for k, v in ref.items()},
            "largest_change": round(change, 4), "drifted": bool(change >= MIN_SHARE_CHANGE)}


def compare(reference: Reference, *, probabilities: Sequence[float], flagged: Sequence[bool],
            inputs: Sequence[FilmInput]) -> dict:
    """The window (its films' probabilities and flags, and the inputs of those that have them)
    against ``reference``: ``{"drifted", "reasons", "window", "flag_rate", "scores", "inputs"}``."""
    if len(probabilities) != len(flagged):
        raise ValueError("one flag per probability")
    out: dict = {"drifted": False, "reasons": [], "window": len(probabilities), "inputs_window": len(inputs),
                 "min_window": MIN_WINDOW, "alpha": ALPHA}
    if len(probabilities) < MIN_WINDOW:
        out["reasons"] = []
        out["note"] = f"{len(probabilities)} films screened; drift is judged on at least {MIN_WINDOW}"
        return out
    out["flag_rate"] = _flag_rate(reference, flagged)
    out["scores"] = _ks(reference.scores, probabilities, MIN_SCORE_D)
    out["inputs"] = {}
    if reference.inputs is None:
        out["inputs_note"] = "the model keeps no reference input statistics"
    elif len(inputs) >= MIN_WINDOW:
        for name in CONTINUOUS:
            out["inputs"][name] = _ks(reference.inputs[name], [getattr(f, name) for f in inputs])
        for name in CATEGORICAL:
            out["inputs"][name] = _mix(reference.inputs.get(name), [getattr(f, name) for f in inputs])
    reasons = []
    if out["flag_rate"]["drifted"]:
        reasons.append(f"flag rate {out['flag_rate']['window']:.2f} against {out['flag_rate']['reference']:.2f} "
                       f"on the held-out films")
    for name, figures in (("scores", out["scores"]), *out["inputs"].items()):
        if figures["drifted"]:
            if "statistic" in figures:
                reasons.append(f"{name}: median {figures['window_median']:g} against {figures['reference_median']:g} "
                               f"(KS D {figures['statistic']:.2f}, p {figures['p_value']:.1e})")
            else:
                reasons.append(f"{name} mix: a share moved by {figures['largest_change']:.2f}")
    out["drifted"], out["reasons"] = bool(reasons), reasons
    return out
