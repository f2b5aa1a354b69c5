"""Which received instances are screened. Each refusal carries a reason."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

#: Modalities screened (also on Secondary Capture objects: public chest X-ray
#: sets such as RSNA's and NIH's are SC-wrapped CR).
SCREENED_MODALITIES = frozenset({"CR", "DX"})
#: BodyPartExamined values taken as chest; an absent value is accepted.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "PORTABLE CHEST"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"})
MIN_SIDE = 128


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "Eligibility":
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality not in SCREENED_MODALITIES:
            return cls(False, f"modality {modality or '(none)'} is not screened (CR/DX only)")
        if "PixelData" not in ds:
            return cls(False, "no pixel data")
        body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        if body_part and body_part not in CHEST_BODY_PARTS:
            return cls(False, f"body part {body_part} is not chest")
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        if view in LATERAL_VIEWS:
            return cls(False, f"view position {view} is lateral; only frontal views are screened")
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if min(rows, columns) < MIN_SIDE:
            return cls(False, f"image {columns}x{rows} is smaller than {MIN_SIDE} px")
        return cls(True)
