"""Which received instances are screened. Each refusal carries a reason."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "LLO", "RLO"})

_WORD = re.compile(r"[A-Z0-9]+")


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
        return Eligibility(True)


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
