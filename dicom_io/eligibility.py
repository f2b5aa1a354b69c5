"""Which received instances are screened. Each refusal carries a reason; a screened film whose
patient is not known to be within the model's intended population carries a note."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from pydicom.dataset import Dataset

LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "LLO", "RLO"})

_WORD = re.compile(r"[A-Z0-9]+")
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")  # DICOM AS: "045Y", "018M", "010W", "005D"
#: not AS, but what some archives write (the RSNA pneumonia challenge's films carry "58"): years,
#: read when neither a valid AS value nor a birth date with a study date tells the age
_BARE_YEARS = re.compile(r"^(\d{1,3})$")
_DAYS_PER_YEAR = 365.25
_STUDY_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
OVERRIDE_HINT = ("set PNEUMOSCREEN_INTENDED_POPULATION=any to screen every age once the site has validated "
                 "the model on its own films")


def _text(ds: Dataset, keyword: str) -> str:
    """A single-valued attribute as stripped text; empty when absent, empty or multi-valued."""
    value = ds.get(keyword, None)
    return str(value).strip() if isinstance(value, (str, date)) else ""


def _date(value: str) -> date | None:
    """A DICOM DA (YYYYMMDD, or the old YYYY.MM.DD), or None."""
    value = value.replace(".", "").replace("-", "")
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """The patient's age at the study in years (fractional below a year's unit), or None when the
    header does not tell: PatientAge when it is a valid AS value ("000Y", which some systems write for
    an unknown age, is unknown), else PatientBirthDate and the study's date (StudyDate, else SeriesDate,
    AcquisitionDate, ContentDate), counted in completed months, else a PatientAge of bare digits as years."""
    age_text = _text(ds, "PatientAge").upper()
    match = _AGE.match(age_text)
    if match:
        number, unit = int(match.group(1)), match.group(2)
        if number == 0 and unit == "Y":  # what some systems write for an unknown age
            return None
        return {"Y": float(number), "M": number / 12, "W": number * 7 / _DAYS_PER_YEAR,
                "D": number / _DAYS_PER_YEAR}[unit]
    born = _date(_text(ds, "PatientBirthDate"))
    seen = next((day for day in (_date(_text(ds, keyword)) for keyword in _STUDY_DATES) if day), None)
    if born is not None and seen is not None and seen >= born:
        months = (seen.year - born.year) * 12 + seen.month - born.month - (seen.day < born.day)
        return months / 12
    bare = _BARE_YEARS.match(age_text)
    return float(bare.group(1)) if bare and int(bare.group(1)) > 0 else None


def describe_age(years: float) -> str:
    """An age as a reason shows it: whole years from 2, months below; over 89 as one group (HIPAA)."""
    if years >= 90:
        return "over 89 years"
    if years >= 2:
        return f"{math.floor(years)} years"
    months = math.floor(years * 12 + 1e-6)
    return "under 1 month" if months < 1 else f"{months} month{'s' if months != 1 else ''}"


@dataclass(frozen=True, kw_only=True)
class IntendedPopulation:
    """Whom the model was trained on, from its card's ``intended_population``: ages in completed
    years, both bounds inclusive (``max_age_years`` None: no upper bound)."""

    min_age_years: int = 0
    max_age_years: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.min_age_years <= 150 or (
                self.max_age_years is not None and not self.min_age_years <= self.max_age_years <= 150):
            raise ValueError(f"intended population ages {self.min_age_years}-{self.max_age_years} are not a range "
                             "of completed years within 0-150")

    @classmethod
    def from_card(cls, intended: Mapping[str, Any] | None) -> "IntendedPopulation | None":
        """The population a card's ``intended_population`` states; None when it states no ages (no gate)."""
        ages = (intended or {}).get("age_years")
        if not ages:
            return None
        try:
            low, high = ages.get("min"), ages.get("max")
            return cls(min_age_years=int(low or 0), max_age_years=None if high is None else int(high),
                       description=str(intended.get("description") or ""))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"model card intended_population.age_years must be like {{\"min\": 1, \"max\": 5}} "
                             f"(completed years), got {ages!r}: {exc}") from None

    @property
    def ages(self) -> str:
        if self.max_age_years is None:
            return f"ages {self.min_age_years} and over"
        return f"ages {self.min_age_years}-{self.max_age_years}"

    def includes(self, age_years: float) -> bool:
        completed = math.floor(age_years + 1e-6)
        return completed >= self.min_age_years and (self.max_age_years is None or completed <= self.max_age_years)


@dataclass(frozen=True, kw_only=True)
class EligibilityPolicy:
    """What is screened. Built from the settings (``worker.runtime.eligibility_policy``), which hold
    the defaults (chest radiography practice) and read ``PNEUMOSCREEN_ELIGIBLE_MODALITIES`` and friends."""

    modalities: frozenset[str]
    """Modality values screened, also on Secondary Capture objects (public chest
    X-ray sets such as RSNA's and NIH's are SC-wrapped CR)."""
    chest_body_parts: frozenset[str]
    """BodyPartExamined values taken as chest, whole or as one word of the value ("CHEST_PA",
    "PORT CHEST"); an absent value is accepted. A lateral word in it ("CHEST LAT") is refused."""
    min_side: int
    """Smallest accepted Rows / Columns."""
    lateral_views: frozenset[str] = field(default=LATERAL_VIEWS)
    """ViewPosition values refused: the model reads frontal (PA/AP) films."""
    population: IntendedPopulation | None = None
    """Whom the model was trained on (its card); films of other ages are refused. None: no age gate."""
    screen_any_age: bool = False
    """Screen films outside ``population`` too, each one noted (``PNEUMOSCREEN_INTENDED_POPULATION=any``,
    for a site that has validated the model on its own films)."""

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("at least one modality must be screened")
        if self.min_side < 1:
            raise ValueError(f"min_side must be positive, got {self.min_side}")

    def judge(self, ds: Dataset) -> "Eligibility":
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality not in self.modalities:
            return Eligibility(False, f"modality {modality or '(none)'} is not screened "
                                      f"({'/'.join(sorted(self.modalities))} only)")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return Eligibility(False, "no pixel data")
        intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
        if intent == "FOR PROCESSING":
            return Eligibility(False, "a FOR PROCESSING image (raw detector data) is not screened; "
                                      "send the FOR PRESENTATION image")
        body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        words = set(_WORD.findall(body_part))
        if body_part and body_part not in self.chest_body_parts and not words & self.chest_body_parts:
            return Eligibility(False, f"body part {body_part} is not chest")
        if words & self.lateral_views:
            return Eligibility(False, f"body part {body_part} names a lateral view; only frontal views are screened")
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        if view in self.lateral_views:
            return Eligibility(False, f"view position {view} is lateral; only frontal views are screened")
        if not view:  # many CR films lack it: the lateral of a PA + lateral study must not be screened
            hint = _lateral_hint(ds)
            if hint:
                return Eligibility(False, f"{hint}: a lateral view; only frontal views are screened")
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if min(rows, columns) < self.min_side:
            return Eligibility(False, f"image {columns}x{rows} is smaller than {self.min_side} px")
        return self._judge_age(ds)

    def _judge_age(self, ds: Dataset) -> "Eligibility":
        """Outside the intended population: refused, or screened with a note. A film whose header does
        not tell the age is screened with a note: refusing it would refuse every de-identified film."""
        population = self.population
        if population is None:
            return Eligibility(True)
        age = patient_age_years(ds)
        if age is None:
            return Eligibility(True, note=f"age unknown: not confirmed within the intended population "
                                          f"({population.ages})")
        if population.includes(age):
            return Eligibility(True)
        aged = f"patient aged {describe_age(age)}"
        if self.screen_any_age:
            return Eligibility(True, note=f"outside the intended population: {aged} (trained on {population.ages})")
        # cut, so that the stored reason (500 characters at most) keeps the way out at its end
        description = population.description if len(population.description) <= 200 \
            else population.description[:197] + "..."
        trained_on = population.ages + (f": {description}" if description else "")
        return Eligibility(False, f"outside the model's intended population: {aged} (the model was trained on "
                                  f"{trained_on}); {OVERRIDE_HINT}")


def _lateral_hint(ds: Dataset) -> str | None:
    """Where a film without ViewPosition says it is a lateral, if it does: the view code, the
    patient orientation (rows running anterior or posterior) or a description naming it."""
    for item in ds.get("ViewCodeSequence", None) or []:
        meaning = str(item.get("CodeMeaning", "") or "").upper()
        if "LATERAL" in meaning or "LATERO" in meaning:
            return f"view code {meaning.lower()}"
    orientation = ds.get("PatientOrientation", None)
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 \
            and str(orientation[0]).strip().upper() in ("A", "P"):
        return "patient orientation " + "\\".join(str(value) for value in orientation)
    for keyword in ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription"):
        text = str(ds.get(keyword, "") or "").strip().upper()
        words = set(_WORD.findall(text))
        if words & {"LAT", "LATERAL"} and not words & {"PA", "AP", "FRONTAL"}:  # not "CHEST PA AND LAT"
            return f"{keyword} {text[:64]!r}"
    return None


@dataclass(frozen=True)
class Eligibility:
    """A verdict of ``EligibilityPolicy.judge``: screened, or not with the reason."""

    eligible: bool
    reason: str | None = None
    note: str | None = None
    """What the reader of a screened film's result must know: its patient is outside, or not known
    to be within, the model's intended population."""
