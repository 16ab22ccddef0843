"""The audit trail: appending events (the database refuses changes) and querying them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from storage.audit import AuditRecord, Outcome
from storage.models import (
    AuditEvent,
)


def append_audit(session: Session, *, record: AuditRecord) -> AuditEvent:
    row = AuditEvent(
        event_code=record.kind.code,
        event=record.kind.event,
        event_type=record.kind.event_type,
        action=record.kind.action,
        outcome=int(record.outcome),
        actor_ae=record.actor_ae,
        actor_host=record.actor_host,
        actor_user=record.actor_user,
        patient_id=record.patient_id,
        study_instance_uid=record.study_instance_uid,
        detail=record.detail,
    )
    if record.occurred_at is not None:
        row.occurred_at = record.occurred_at
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class AuditFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    event: str | None = None
    ae: str | None = None
    host: str | None = None
    patient: str | None = None
    study: str | None = None
    outcome: Outcome | None = None
    user: str | None = None
    limit: int = 1000


def query_audit(session: Session, *, where: AuditFilter) -> Sequence[AuditEvent]:
    stmt = select(AuditEvent)
    if where.since is not None:
        stmt = stmt.where(AuditEvent.occurred_at >= where.since)
    if where.until is not None:
        stmt = stmt.where(AuditEvent.occurred_at < where.until)
    if where.event:
        wanted = where.event.lower()
        stmt = stmt.where(
            or_(
                func.lower(AuditEvent.event) == wanted,
                func.lower(AuditEvent.event_type) == wanted,
                AuditEvent.event_code == where.event,
            )
        )
    if where.ae:
        stmt = stmt.where(AuditEvent.actor_ae == where.ae)
    if where.host:
        stmt = stmt.where(AuditEvent.actor_host == where.host)
    if where.patient:
        stmt = stmt.where(AuditEvent.patient_id == where.patient)
    if where.study:
        stmt = stmt.where(AuditEvent.study_instance_uid == where.study)
    if where.outcome is not None:
        stmt = stmt.where(AuditEvent.outcome == int(where.outcome))
    if where.user:
        stmt = stmt.where(AuditEvent.actor_user == where.user)
    stmt = stmt.order_by(AuditEvent.id.desc()).limit(where.limit)
    return list(reversed(session.scalars(stmt).all()))
