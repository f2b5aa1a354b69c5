"""The response bodies of the HTTP API, as pydantic models (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from db.models import InstanceState
from db.results import StudyState

_DATE_TIME = {"format": "date-time"}

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
"""A DICOM UID as a path or query parameter."""

_POPULATION_NOTE = ("its patient is outside, or not known to be within, the model's intended population: "
                    "read the result with that in mind")


class WorklistRow(BaseModel):
    """One study on the radiologists' worklist (a row of ``pneumoscreen worklist --json``)."""

    study_instance_uid: str
    accession_number: str | None
    priority: int = Field(description="1 flagged, 2 in progress or with images that failed, 3 routine")
    flagged: bool = Field(description="some image's latest prediction is at or above its model's threshold")
    max_probability: float | None = Field(description="highest latest probability of pneumonia among its images")
    state: StudyState
    received_at: str | None = Field(description="first image received (UTC, ISO 8601)", json_schema_extra=_DATE_TIME)
    model_version: str | None
    study_date: str | None = Field(description="DICOM StudyDate as sent (YYYYMMDD)")
    images: int = Field(description="images received for the study")
    population_note: str | None = Field(None, description="a screened image's patient is outside, or not known to "
                                                          "be within, the model's intended population (the most "
                                                          "serious note of the study's images)")


class InstanceRow(BaseModel):
    """One received image (a row of ``pneumoscreen instances --json``)."""

    sop_instance_uid: str
    study_instance_uid: str | None = Field(description="None for a dataset that could not be parsed")
    series_instance_uid: str | None
    state: InstanceState
    reason: str | None = Field(description="why it was skipped or failed")
    probability: float | None = Field(description="latest probability of pneumonia")
    model_version: str | None
    population_note: str | None = Field(None, description=_POPULATION_NOTE)


class PredictionOut(BaseModel):
    """One model's answer for one image."""

    model_name: str
    model_version: str
    weights_sha256: str
    probability: float
    threshold: float
    flagged: bool
    created_at: str | None = Field(json_schema_extra=_DATE_TIME)


class StudyInstance(BaseModel):
    """An image of a study, with every model's answer, oldest first."""

    sop_instance_uid: str
    series_instance_uid: str
    modality: str | None
    sop_class_uid: str
    state: InstanceState
    reason: str | None
    population_note: str | None = Field(None, description=_POPULATION_NOTE)
    received_at: str | None = Field(json_schema_extra=_DATE_TIME)
    probability: float | None = Field(description="latest probability of pneumonia")
    model_version: str | None
    predictions: list[PredictionOut]


class VerdictOut(BaseModel):
    """One verdict on a study, as recorded."""

    finding: Literal["pneumonia", "normal"]
    source: Literal["radiologist", "ris-report"]
    actor: str = Field(description="who recorded it: user:<account>, api:<shared token fingerprint>, ris:<sender>")
    reference: str | None = None
    recorded_at: str = Field(json_schema_extra=_DATE_TIME)


class StudyVerdicts(BaseModel):
    """A study's current verdict and every verdict recorded on it."""

    verdict: VerdictOut | None
    verdicts: list[VerdictOut]


class AccountOut(BaseModel):
    """An account: never its token or password."""

    name: str
    role: Literal["radiologist", "operator", "admin"]
    has_password: bool
    created_at: str = Field(json_schema_extra=_DATE_TIME)
    disabled_at: str | None = Field(json_schema_extra=_DATE_TIME)


class StudyDetail(BaseModel):
    """A study: its worklist row and its images."""

    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    received_at: str | None = Field(json_schema_extra=_DATE_TIME)
    priority: int | None = None
    flagged: bool | None = None
    max_probability: float | None = None
    state: StudyState | None = None
    model_version: str | None = None
    images: int | None = None
    population_note: str | None = None
    instances: list[StudyInstance]
    verdict: VerdictOut | None = Field(None, description="the current verdict: the newest radiologist's, "
                                                          "else the newest from the RIS's final report")
    verdicts: list[VerdictOut] = Field(default_factory=list, description="every verdict recorded, oldest first")


class Health(BaseModel):
    """Whether this API can answer: its database is reachable and its schema current."""

    model_config = ConfigDict(populate_by_name=True)

    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unreachable"]
    schema_state: Literal["current", "not current", "unknown"] = Field(alias="schema")
    model_version: str | None = Field(description="version of the configured model artifact")
    detail: str | None = None


class ErrorDetail(BaseModel):
    detail: Any
