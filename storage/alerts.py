"""Alerts: raised with the result or series verdict that flags a mismatch, listed open first,
and closed by a reviewer as confirmed or dismissed."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from storage.audit import ALERT_REVIEWED, GALLERY_ENROLLMENT, AuditRecord
from storage.gallery import NewGalleryEntry, add_gallery_entries
from storage.models import (
    Alert,
    AlertEvent,
    AlertEventKind,
    AlertKind,
    AlertScope,
    AlertState,
    Result,
    SeriesVerdictRow,
    utcnow,
)

MISMATCH = "mismatch"


class AlertReviewError(ValueError):
    """A review that cannot be recorded (no such alert, decided already, no reason)."""


class AlertNotFound(AlertReviewError):
    """No alert has this id."""


class AlertDecided(AlertReviewError):
    """The alert was confirmed or dismissed already."""


@dataclass(frozen=True)
class FlaggedEmbedding:
    """The flagged image's embedding, under the model that made it."""

    vector: bytes  # float32, little-endian
    model_version: str
    modality: str


@dataclass(frozen=True)
class FlaggedImage:
    """What an image's alert says of it besides its result."""

    patient_id: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    header_modality: str | None
    embedding: FlaggedEmbedding | None = None


def raise_image_alerts(
    session: Session,
    *,
    result: Result,
    image: FlaggedImage,
    by: str,
    kinds: tuple[str, ...] = ("modality", "identity"),
) -> list[Alert]:
    """One alert for each mismatch of an image's result (none where it agrees), of the
    ``kinds`` checks asked for."""
    raised = []
    for kind, flagged in (
        (AlertKind.MODALITY_MISMATCH, "modality" in kinds and result.modality_verdict == MISMATCH),
        (AlertKind.PATIENT_MISMATCH, "identity" in kinds and result.identity_verdict == MISMATCH),
    ):
        if not flagged:
            continue
        kept = image.embedding if kind == AlertKind.PATIENT_MISMATCH else None
        alert = Alert(
            kind=kind,
            scope=AlertScope.IMAGE,
            embedding=kept.vector if kept else None,
            embedding_model=kept.model_version if kept else None,
            embedding_modality=kept.modality if kept else None,
            result_id=result.id,
            patient_id=image.patient_id,
            study_instance_uid=image.study_instance_uid,
            series_instance_uid=image.series_instance_uid,
            sop_instance_uid=image.sop_instance_uid,
            suspected_patient_id=result.matched_patient_id
            if kind == AlertKind.PATIENT_MISMATCH
            else None,
            header_modality=image.header_modality,
            predicted_modality=result.predicted_modality,
            detail=_image_detail(result),
            raised_by=by,
        )
        session.add(alert)
        raised.append(alert)
    session.flush()
    _events(session, raised, AlertEventKind.RAISED)
    return raised


def _events(session: Session, alerts: Sequence[Alert], kind: AlertEventKind) -> None:
    """What people outside are told of, written with the change (the outbox's source)."""
    session.add_all(AlertEvent(alert_id=a.id, event=kind) for a in alerts)


def _image_detail(result: Result) -> dict[str, Any]:
    return {
        "modality_scores": result.modality_scores,
        "top_matches": result.top_matches,
        "threshold": result.identity_threshold,
        "margin": result.identity_margin,
        "header_score": result.identity_header_score,
        "model_versions": result.model_versions,
        # the header patient's PACS prior studies the image disagrees with, where it was
        # judged against priors
        "prior_studies": result.priors,
    }


def sync_series_alerts(session: Session, *, row: SeriesVerdictRow, by: str) -> list[Alert]:
    """The series' open alerts follow its verdict: raised once, updated when the series is
    judged again (a decided one is left as its reviewer left it). Returns those raised."""
    existing = {
        a.kind: a for a in session.scalars(select(Alert).where(Alert.series_verdict_id == row.id))
    }
    raised = []
    now = utcnow()
    for kind, flagged in (
        (AlertKind.MODALITY_MISMATCH, row.modality_verdict == MISMATCH),
        (AlertKind.PATIENT_MISMATCH, row.identity_verdict == MISMATCH),
    ):
        detail = {
            "revision": row.revision,
            "images": row.images,
            "still_mismatch": flagged,
            "modality_agreement": row.modality_agreement,
            "header_score": row.header_score,
            "best_other_score": row.best_other_score,
            "threshold": row.threshold,
            "margin": row.margin,
        }
        alert = existing.get(kind)
        if alert is not None:
            if alert.state == AlertState.OPEN:
                alert.detail = detail
                alert.suspected_patient_id = _suspect(kind, row)
                alert.predicted_modality = row.predicted_modality
                alert.updated_at = now
            continue
        if not flagged:
            continue
        alert = Alert(
            kind=kind,
            scope=AlertScope.SERIES,
            series_verdict_id=row.id,
            patient_id=row.patient_id,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            suspected_patient_id=_suspect(kind, row),
            header_modality=row.header_modality,
            predicted_modality=row.predicted_modality,
            detail=detail,
            raised_by=by,
            raised_at=now,
            updated_at=now,
        )
        session.add(alert)
        raised.append(alert)
    session.flush()
    _events(session, raised, AlertEventKind.RAISED)
    return raised


def _suspect(kind: str, row: SeriesVerdictRow) -> str | None:
    return row.matched_patient_id if kind == AlertKind.PATIENT_MISMATCH else None


@dataclass(frozen=True)
class AlertQuery:
    """Which alerts to list; open ones come first, newest first within each state."""

    state: AlertState | None = None
    kind: AlertKind | None = None
    patient: str | None = None  # the header patient or the suspected one
    study: str | None = None
    limit: int = 100
    offset: int = 0

    @classmethod
    def named(cls, state: str, kind: str | None = None, **filters: Any) -> AlertQuery:
        """From the worklist's names: ``state`` one of the states or ``all``."""
        return cls(
            state=None if state == "all" else AlertState(state),
            kind=AlertKind(kind) if kind else None,
            **filters,
        )


def list_alerts(session: Session, *, where: AlertQuery) -> tuple[list[Alert], int]:
    conditions = []
    if where.state is not None:
        conditions.append(Alert.state == where.state)
    if where.kind is not None:
        conditions.append(Alert.kind == where.kind)
    if where.patient:
        conditions.append(
            (Alert.patient_id == where.patient) | (Alert.suspected_patient_id == where.patient)
        )
    if where.study:
        conditions.append(Alert.study_instance_uid == where.study)
    open_first = case((Alert.state == AlertState.OPEN, 0), else_=1)
    rows = session.scalars(
        select(Alert)
        .where(*conditions)
        .order_by(open_first, Alert.raised_at.desc(), Alert.id.desc())
        .limit(where.limit)
        .offset(where.offset)
    ).all()
    total = session.scalar(select(func.count()).select_from(Alert).where(*conditions))
    return list(rows), int(total or 0)


def alert_counts(session: Session) -> dict[str, int]:
    """How many alerts are in each state."""
    counted: Sequence[Any] = session.execute(
        select(Alert.state, func.count()).group_by(Alert.state)
    ).all()
    return {str(state): int(n) for state, n in counted}


def review_alert(
    session: Session,
    *,
    alert_id: int,
    decision: AlertState,
    reviewer: str,
    reason: str | None,
    now: dt.datetime | None = None,
    enroll: bool = False,
) -> Alert:
    """Confirm or dismiss an open alert. A dismissal needs a reason; a decided alert stays
    decided (a second review is refused, so the first reviewer's word is never overwritten).

    ``enroll``: a dismissed patient mismatch of an image also enrolls that image under its
    header patient (the reviewer says it is theirs), so their next image is ``consistent``.
    A confirmed alert never enrolls its image."""
    alert = session.get(Alert, alert_id, with_for_update=True)
    if alert is None:
        raise AlertNotFound(f"no alert {alert_id}")
    if decision == AlertState.OPEN:
        raise AlertReviewError("a review confirms or dismisses an alert")
    if enroll and decision != AlertState.DISMISSED:
        raise AlertReviewError("only a dismissed alert may enroll its image")
    reason = (reason or "").strip() or None
    if decision == AlertState.DISMISSED and reason is None:
        raise AlertReviewError("a dismissal needs a reason")
    if alert.state != AlertState.OPEN:
        raise AlertDecided(
            f"alert {alert_id} was {alert.state} by {alert.reviewed_by} at "
            f"{alert.reviewed_at:%Y-%m-%d %H:%M}"
        )
    if enroll and (
        alert.embedding is None
        or alert.embedding_model is None
        or alert.embedding_modality is None
        or alert.result_id is None
        or not alert.patient_id
    ):
        raise AlertReviewError(
            f"alert {alert_id} has no image embedding to enroll (only an image's patient "
            "mismatch has one)"
        )
    now = now or utcnow()
    if enroll:
        assert alert.embedding is not None and alert.embedding_model is not None
        assert alert.embedding_modality is not None and alert.patient_id
        result = session.get(Result, alert.result_id)
        add_gallery_entries(
            session,
            entries=[
                NewGalleryEntry(
                    patient_id=alert.patient_id,
                    modality=alert.embedding_modality,
                    model_version=alert.embedding_model,
                    embedding=alert.embedding,
                    source_instance_id=result.instance_id if result is not None else None,
                    source_path=None,
                    enrolled_by=reviewer,
                )
            ],
        )
    alert.state = decision
    alert.reviewed_by = reviewer
    alert.reviewed_at = now
    alert.review_reason = reason
    alert.updated_at = now
    _events(session, [alert], AlertEventKind.REVIEWED)
    session.flush()
    return alert


def review_audit(
    alert: Alert,
    *,
    actor_user: str,
    actor_host: str | None,
    interface: str,
    enrolled: bool,
    occurred_at: dt.datetime | None = None,
) -> list[AuditRecord]:
    """The audit events of a decision: the review, and the enrollment it made if any."""
    common: dict[str, Any] = {
        "actor_user": actor_user,
        "actor_host": actor_host,
        "patient_id": alert.patient_id,
        "study_instance_uid": alert.study_instance_uid,
        "occurred_at": occurred_at,
    }
    records = [
        AuditRecord(
            kind=ALERT_REVIEWED,
            detail={
                "interface": interface,
                "alert_id": alert.id,
                "alert_kind": alert.kind,
                "decision": alert.state,
                "reason": alert.review_reason,
                "suspected_patient_id": alert.suspected_patient_id,
                "enrolled": enrolled,
            },
            **common,
        )
    ]
    if enrolled:
        records.append(
            AuditRecord(
                kind=GALLERY_ENROLLMENT,
                detail={
                    "interface": interface,
                    "policy": "dismissed alert",
                    "alert_id": alert.id,
                    "model": alert.embedding_model,
                    "sop_instance_uid": alert.sop_instance_uid,
                },
                **common,
            )
        )
    return records
