"""What the JSON API answers: the pydantic models its OpenAPI description is made from."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

Verdict = Literal[
    "mismatch", "agree", "tag_missing", "unsupported", "consistent", "new_patient", "unverifiable"
]
Status = Literal["ok", "failed"]
AuditOutcome = Literal["success", "minor", "serious", "major"]


class ProblemOut(BaseModel):
    detail: str


class CountsOut(BaseModel):
    total: int
    by_modality: dict[str, int]
    by_sender: dict[str, int]


class AlertsOut(BaseModel):
    images: int = Field(description="open alerts of images (no reviewer has decided them)")
    series: int = Field(description="open alerts of series")


class QueueOut(BaseModel):
    pending: int
    running: int
    failed_last_7_days: int


class HourOut(BaseModel):
    hour: dt.datetime
    instances: int


class SenderRateOut(BaseModel):
    calling_ae: str
    results: int
    mismatches: int
    rate: float


class DashboardOut(BaseModel):
    generated_at: dt.datetime
    today: CountsOut
    week: CountsOut
    open_alerts: AlertsOut
    queue: QueueOut
    active_models: dict[str, str] = Field(description="slot -> version, as activated")
    models_in_use: dict[str, str] = Field(description="versions the newest result ran")
    arrivals_by_hour: list[HourOut]
    mismatch_by_sender: list[SenderRateOut]


class MatchOut(BaseModel):
    patient_id: str
    score: float


class ResultSummaryOut(BaseModel):
    id: int
    received_at: dt.datetime
    calling_ae: str
    patient_id: str | None
    modality: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str
    status: str
    predicted_modality: str | None
    modality_verdict: str | None
    identity_verdict: str | None
    matched_patient_id: str | None
    best_score: float | None


class ResultPageOut(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[ResultSummaryOut]


class SeriesVerdictOut(BaseModel):
    series_instance_uid: str
    study_instance_uid: str | None
    patient_id: str | None
    header_modality: str | None
    images: int
    images_analysed: int
    predicted_modality: str | None
    modality_verdict: str | None
    identity_verdict: str | None
    matched_patient_id: str | None
    modality_agreement: float | None
    header_score: float | None
    best_other_score: float | None
    threshold: float | None
    margin: float | None
    last_received_at: dt.datetime
    decided_at: dt.datetime
    revision: int


class SeriesPageOut(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[SeriesVerdictOut]


class PriorStudyOut(BaseModel):
    """A PACS prior study an image was judged against."""

    study_instance_uid: str | None
    study_date: str | None
    node: str | None
    images: int


class ResultDetailOut(ResultSummaryOut):
    version: int
    sop_class_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    peer_host: str
    instance_state: str
    created_at: dt.datetime
    worker: str
    failed_stage: str | None
    failure_reason: str | None
    shape: list[int] | None
    photometric: str | None
    modality_scores: dict[str, float] | None
    routed_to: str | None
    top_matches: list[MatchOut]
    identity_threshold: float | None
    identity_margin: float | None
    identity_header_score: float | None
    identity_reason: str | None
    prior_studies: list[PriorStudyOut]
    awaiting_priors: bool
    judged_again_at: dt.datetime | None
    model_versions: dict[str, str] | None
    timings_ms: dict[str, float]
    series_verdict: SeriesVerdictOut | None


class AuditEventOut(BaseModel):
    id: int
    occurred_at: dt.datetime
    event_code: str
    event: str
    event_type: str | None
    action: str
    outcome: int
    actor_ae: str | None
    actor_host: str | None
    actor_user: str | None
    patient_id: str | None
    study_instance_uid: str | None
    detail: dict[str, Any]


class AuditPageOut(BaseModel):
    limit: int
    items: list[AuditEventOut]


AlertKindName = Literal["modality_mismatch", "patient_mismatch"]
AlertStateName = Literal["open", "confirmed", "dismissed"]


class AlertOut(BaseModel):
    """A mismatch for a person to decide: confirmed (real) or dismissed (a false alarm)."""

    id: int
    kind: AlertKindName
    scope: Literal["image", "series"]
    state: AlertStateName
    result_id: int | None
    series_verdict_id: int | None
    patient_id: str | None = Field(description="the header's PatientID")
    suspected_patient_id: str | None = Field(description="the patient the pixels resemble")
    header_modality: str | None
    predicted_modality: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    detail: dict[str, Any]
    raised_at: dt.datetime
    raised_by: str
    updated_at: dt.datetime
    reviewed_by: str | None
    reviewed_at: dt.datetime | None
    review_reason: str | None


class AlertPageOut(BaseModel):
    total: int
    offset: int
    limit: int
    counts: dict[str, int] = Field(description="alerts in each state, whatever the filters")
    items: list[AlertOut]


class ReviewIn(BaseModel):
    decision: Literal["confirmed", "dismissed"]
    reason: str | None = Field(None, max_length=1000, description="needed to dismiss")
    enroll: bool = Field(
        False,
        description="with a dismissed patient mismatch of an image: also enroll the image "
        "under its header patient",
    )
