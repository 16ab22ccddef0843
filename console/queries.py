"""What the console's pages and API show: their parameters, and the loaders that turn the
storage layer's rows into the API's models. Pure functions over a session; no web here."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints
from sqlalchemy.orm import Session

from console.schemas import (
    AlertsOut,
    AuditEventOut,
    AuditOutcome,
    CountsOut,
    DashboardOut,
    HourOut,
    MatchOut,
    PriorStudyOut,
    QueueOut,
    ResultDetailOut,
    ResultPageOut,
    ResultSummaryOut,
    SenderRateOut,
    SeriesPageOut,
    SeriesVerdictOut,
    Status,
    Verdict,
)
from storage import audit
from storage.audit_trail import AuditFilter, query_audit
from storage.models import AuditEvent, Instance, Result, SeriesVerdictRow
from storage.reports import dashboard, result_detail, series_verdict_of
from storage.results import ResultQuery, SeriesQuery, page_results, page_series

# Filter values are bounded as the columns they are compared with.
Text16 = Annotated[str, StringConstraints(max_length=16)] | None
Text64 = Annotated[str, StringConstraints(max_length=64)] | None
Text255 = Annotated[str, StringConstraints(max_length=255)] | None


def _iso_day(value: Any) -> Any:
    """A day only as the description says, YYYY-MM-DD: pydantic would also read a number as
    seconds since 1970, so that `until=0` meant 1 January 1970."""
    if isinstance(value, dt.date) or (isinstance(value, str) and ISO_DAY.fullmatch(value)):
        return value
    raise ValueError("expected a day as YYYY-MM-DD")


ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
Day = Annotated[dt.date, BeforeValidator(_iso_day)] | None


class ResultParams(BaseModel):
    verdict: Verdict | None = None
    modality: Text16 = Field(None, description="header Modality code, e.g. CT")
    ae: Text16 = Field(None, description="calling AE title of the sender")
    patient: Text64 = Field(None, description="header or matched patient ID")
    study: Text64 = Field(None, description="Study Instance UID")
    received_from: Day = Field(None, description="first day of arrival (UTC), inclusive")
    received_to: Day = Field(None, description="last day of arrival (UTC), inclusive")
    status: Status | None = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000_000)


class SeriesParams(BaseModel):
    verdict: Verdict | None = None
    patient: Text64 = Field(None, description="header or matched patient ID")
    study: Text64 = Field(None, description="Study Instance UID")
    decided_from: Day = Field(None, description="first day of the decision (UTC), inclusive")
    decided_to: Day = Field(None, description="last day of the decision (UTC), inclusive")
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000_000)


class AuditParams(BaseModel):
    event: Text64 = Field(None, description="event, event type or code, e.g. Security Alert")
    ae: Text16 = None
    host: Text255 = None
    user: Text64 = Field(None, description="the acting user")
    patient: Text64 = None
    study: Text64 = None
    outcome: AuditOutcome | None = None
    since: Day = Field(None, description="first day (UTC), inclusive")
    until: Day = Field(None, description="last day (UTC), inclusive")
    limit: int = Field(200, ge=1, le=100_000)


def _day_start(day: dt.date | None) -> dt.datetime | None:
    return dt.datetime.combine(day, dt.time(), dt.UTC) if day is not None else None


def _day_after(day: dt.date | None) -> dt.datetime | None:
    return _day_start(day + dt.timedelta(days=1)) if day is not None else None


def filters_of(params: BaseModel) -> dict[str, Any]:
    """The filters a user set, as the audit event records them."""
    return {
        key: (value.isoformat() if isinstance(value, dt.date) else value)
        for key, value in params.model_dump().items()
        if value is not None and key not in ("limit", "offset")
    }


def aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


# --------------------------------------------------------------------------- loaders


def summary_of(result: Result, instance: Instance) -> dict[str, Any]:
    matches = result.top_matches or []
    return {
        "id": result.id,
        "received_at": aware(instance.received_at),
        "calling_ae": instance.calling_ae,
        "patient_id": instance.patient_id,
        "modality": instance.modality,
        "study_instance_uid": instance.study_instance_uid,
        "series_instance_uid": instance.series_instance_uid,
        "sop_instance_uid": instance.sop_instance_uid,
        "status": result.status,
        "predicted_modality": result.predicted_modality,
        "modality_verdict": result.modality_verdict,
        "identity_verdict": result.identity_verdict,
        "matched_patient_id": result.matched_patient_id,
        "best_score": float(matches[0]["score"]) if matches else None,
    }


def load_results(db: Session, params: ResultParams) -> ResultPageOut:
    rows, total = page_results(
        db,
        where=ResultQuery(
            verdict=params.verdict,
            modality=params.modality,
            ae=params.ae,
            patient=params.patient,
            study=params.study,
            received_from=_day_start(params.received_from),
            received_before=_day_after(params.received_to),
            status=params.status,
            limit=params.limit,
            offset=params.offset,
        ),
    )
    return ResultPageOut(
        total=total,
        offset=params.offset,
        limit=params.limit,
        items=[ResultSummaryOut(**summary_of(r, i)) for r, i in rows],
    )


def load_detail(db: Session, result_id: int) -> ResultDetailOut | None:
    found = result_detail(db, result_id=result_id)
    return detail_of(db, *found) if found is not None else None


def detail_of(db: Session, result: Result, instance: Instance) -> ResultDetailOut:
    series = series_verdict_of(db, series_uid=instance.series_instance_uid)
    return ResultDetailOut(
        **summary_of(result, instance),
        version=instance.version,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        size_bytes=instance.size_bytes,
        peer_host=instance.peer_host,
        instance_state=instance.state,
        created_at=aware(result.created_at),
        worker=result.worker,
        failed_stage=result.failed_stage,
        failure_reason=result.failure_reason,
        shape=result.shape,
        photometric=result.photometric,
        modality_scores=result.modality_scores,
        routed_to=result.routed_to,
        top_matches=[MatchOut(**m) for m in result.top_matches or []],
        identity_threshold=result.identity_threshold,
        identity_margin=result.identity_margin,
        identity_header_score=result.identity_header_score,
        identity_reason=result.identity_reason,
        prior_studies=[PriorStudyOut(**study) for study in result.priors or []],
        awaiting_priors=result.awaiting_priors,
        judged_again_at=aware(result.judged_again_at) if result.judged_again_at else None,
        model_versions=result.model_versions,
        timings_ms=result.timings_ms or {},
        series_verdict=series_out(series) if series is not None else None,
    )


def series_out(row: SeriesVerdictRow) -> SeriesVerdictOut:
    return SeriesVerdictOut(
        series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid,
        patient_id=row.patient_id,
        header_modality=row.header_modality,
        images=row.images,
        images_analysed=row.images_analysed,
        predicted_modality=row.predicted_modality,
        modality_verdict=row.modality_verdict,
        identity_verdict=row.identity_verdict,
        matched_patient_id=row.matched_patient_id,
        modality_agreement=row.modality_agreement,
        header_score=row.header_score,
        best_other_score=row.best_other_score,
        threshold=row.threshold,
        margin=row.margin,
        last_received_at=aware(row.last_received_at),
        decided_at=aware(row.decided_at),
        revision=row.revision,
    )


def load_series(db: Session, params: SeriesParams) -> SeriesPageOut:
    rows, total = page_series(
        db,
        where=SeriesQuery(
            verdict=params.verdict,
            patient=params.patient,
            study=params.study,
            decided_from=_day_start(params.decided_from),
            decided_before=_day_after(params.decided_to),
            limit=params.limit,
            offset=params.offset,
        ),
    )
    return SeriesPageOut(
        total=total,
        offset=params.offset,
        limit=params.limit,
        items=[series_out(r) for r in rows],
    )


def load_dashboard(db: Session, now: dt.datetime) -> DashboardOut:
    local_now = now.astimezone()  # "today" and "this week" in the server's own time zone
    day_start = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    week_start = day_start - dt.timedelta(days=day_start.weekday())
    board = dashboard(
        db,
        now=now,
        day_start=day_start.astimezone(dt.UTC),
        week_start=week_start.astimezone(dt.UTC),
    )
    return DashboardOut(
        generated_at=now,
        today=CountsOut(
            total=board.received_today,
            by_modality=board.today_by_modality,
            by_sender=board.today_by_sender,
        ),
        week=CountsOut(
            total=board.received_week,
            by_modality=board.week_by_modality,
            by_sender=board.week_by_sender,
        ),
        open_alerts=AlertsOut(images=board.open_image_alerts, series=board.open_series_alerts),
        queue=QueueOut(
            pending=board.queue_pending,
            running=board.queue_running,
            failed_last_7_days=board.failed_recently,
        ),
        active_models=board.active_models,
        models_in_use=board.models_in_use,
        arrivals_by_hour=[HourOut(hour=h, instances=n) for h, n in board.arrivals_by_hour],
        mismatch_by_sender=[
            SenderRateOut(
                calling_ae=ae, results=total, mismatches=bad, rate=bad / total if total else 0.0
            )
            for ae, (total, bad) in board.mismatch_by_sender.items()
        ],
    )


def load_audit(db: Session, params: AuditParams, limit: int) -> list[AuditEventOut]:
    return [_audit_out(e) for e in audit_rows(db, params, limit)]


def audit_rows(db: Session, params: AuditParams, limit: int) -> list[AuditEvent]:
    """The matching audit events, newest first."""
    events = query_audit(
        db,
        where=AuditFilter(
            since=_day_start(params.since),
            until=_day_after(params.until),
            event=params.event,
            ae=params.ae,
            host=params.host,
            patient=params.patient,
            study=params.study,
            outcome=audit.OUTCOME_NAMES[params.outcome] if params.outcome else None,
            user=params.user,
            limit=limit,
        ),
    )
    return list(reversed(events))


def _audit_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut(
        id=event.id,
        occurred_at=aware(event.occurred_at),
        event_code=event.event_code,
        event=event.event,
        event_type=event.event_type,
        action=event.action,
        outcome=event.outcome,
        actor_ae=event.actor_ae,
        actor_host=event.actor_host,
        actor_user=event.actor_user,
        patient_id=event.patient_id,
        study_instance_uid=event.study_instance_uid,
        detail=event.detail,
    )
