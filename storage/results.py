"""Results and series verdicts: listing them, one filter each with one meaning for the
console, its API and the command line, and the series judged once quiet."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, func, or_, select, update
from sqlalchemy.orm import Session

from storage.alerts import sync_series_alerts
from storage.models import (
    Instance,
    Job,
    JobState,
    Result,
    SeriesVerdictRow,
    utcnow,
)


@dataclass(frozen=True)
class ResultQuery:
    """Which results to list (the console, its API, `medreid results`); every filter optional.
    Dates are by arrival; a patient is the header PatientID or the matched one."""

    verdict: str | None = None  # a modality or identity verdict, e.g. "mismatch"
    modality: str | None = None  # header Modality code, e.g. "CT"
    ae: str | None = None  # calling AE title of the sender
    patient: str | None = None  # header PatientID or the matched one
    study: str | None = None
    received_from: dt.datetime | None = None
    received_before: dt.datetime | None = None
    status: str | None = None  # "ok" or "failed"
    limit: int = 100
    offset: int = 0


SelectT = TypeVar("SelectT", bound=Select[*tuple[Any, ...]])


def _filtered(stmt: SelectT, where: ResultQuery) -> SelectT:
    if where.verdict:
        stmt = stmt.where(
            or_(Result.identity_verdict == where.verdict, Result.modality_verdict == where.verdict)
        )
    if where.modality:
        stmt = stmt.where(Instance.modality == where.modality)
    if where.ae:
        stmt = stmt.where(Instance.calling_ae == where.ae)
    if where.patient:
        # Two indexed lookups joined by UNION: an OR across the two tables would scan both.
        by_header = (
            select(Result.id)
            .join(Instance, Instance.id == Result.instance_id)
            .where(Instance.patient_id == where.patient)
        )
        by_match = select(Result.id).where(Result.matched_patient_id == where.patient)
        stmt = stmt.where(Result.id.in_(by_header.union(by_match)))
    if where.study:
        stmt = stmt.where(Instance.study_instance_uid == where.study)
    if where.received_from is not None:
        stmt = stmt.where(Instance.received_at >= where.received_from)
    if where.received_before is not None:
        stmt = stmt.where(Instance.received_at < where.received_before)
    if where.status:
        stmt = stmt.where(Result.status == where.status)
    return stmt


def page_results(
    session: Session, *, where: ResultQuery
) -> tuple[list[tuple[Result, Instance]], int]:
    """One page of results, newest first, and how many match in all."""
    joined = select(Result, Instance).join(Instance, Instance.id == Result.instance_id)
    stmt = _filtered(joined, where).order_by(Result.id.desc())
    rows = [(r, i) for r, i in session.execute(stmt.limit(where.limit).offset(where.offset))]
    counted = _filtered(
        select(func.count()).select_from(Result).join(Instance, Instance.id == Result.instance_id),
        where,
    )
    return rows, int(session.scalar(counted) or 0)


@dataclass(frozen=True)
class SeriesQuery:
    verdict: str | None = None  # a modality or identity verdict of the series
    patient: str | None = None  # header or matched patient ID
    study: str | None = None
    decided_from: dt.datetime | None = None
    decided_before: dt.datetime | None = None
    limit: int = 100
    offset: int = 0


def page_series(session: Session, *, where: SeriesQuery) -> tuple[list[SeriesVerdictRow], int]:
    """One page of series verdicts, newest decision first, and how many match in all."""
    conditions: list[ColumnElement[bool]] = []
    if where.verdict:
        conditions.append(
            or_(
                SeriesVerdictRow.modality_verdict == where.verdict,
                SeriesVerdictRow.identity_verdict == where.verdict,
            )
        )
    if where.patient:
        conditions.append(
            or_(
                SeriesVerdictRow.patient_id == where.patient,
                SeriesVerdictRow.matched_patient_id == where.patient,
            )
        )
    if where.study:
        conditions.append(SeriesVerdictRow.study_instance_uid == where.study)
    if where.decided_from is not None:
        conditions.append(SeriesVerdictRow.decided_at >= where.decided_from)
    if where.decided_before is not None:
        conditions.append(SeriesVerdictRow.decided_at < where.decided_before)
    rows = session.scalars(
        select(SeriesVerdictRow)
        .where(*conditions)
        .order_by(SeriesVerdictRow.decided_at.desc(), SeriesVerdictRow.id.desc())
        .limit(where.limit)
        .offset(where.offset)
    ).all()
    total = session.scalar(select(func.count()).select_from(SeriesVerdictRow).where(*conditions))
    return list(rows), int(total or 0)


@dataclass(frozen=True)
class QuietSeries:
    series_instance_uid: str
    last_received_at: dt.datetime


def quiet_series(
    session: Session,
    *,
    modalities: Sequence[str],
    quiet_before: dt.datetime,
    lookback: dt.timedelta = dt.timedelta(days=2),
    limit: int = 50,
) -> list[QuietSeries]:
    """Series of these header modalities that are complete and not yet judged as they stand.

    Complete: the last image arrived before ``quiet_before``, every job of the series is
    finished and none of its images waits for priors. Not judged as they stand: no verdict
    yet, or one decided before the last image.
    Only series with an image received within ``lookback`` before ``quiet_before`` are
    considered, so the query reads recent rows, not the whole archive."""
    unfinished = (
        select(Instance.series_instance_uid)
        .join(Job, Job.instance_id == Instance.id)
        .where(Job.state.in_([JobState.PENDING, JobState.RUNNING]))
        .where(Instance.series_instance_uid.is_not(None))
    )
    # an image that waits for its patient's PACS priors holds its series' verdict back
    waiting = (
        select(Instance.series_instance_uid)
        .join(Result, Result.instance_id == Instance.id)
        .where(Result.awaiting_priors.is_(True))
        .where(Instance.series_instance_uid.is_not(None))
    )
    last = func.max(Instance.received_at)
    complete = (
        select(Instance.series_instance_uid.label("uid"), last.label("last"))
        .where(Instance.modality.in_(list(modalities)))
        .where(Instance.received_at >= quiet_before - lookback)
        .where(Instance.series_instance_uid.is_not(None))
        .where(Instance.series_instance_uid.not_in(unfinished))
        .where(Instance.series_instance_uid.not_in(waiting))
        .group_by(Instance.series_instance_uid)
        .having(last < quiet_before)
        .subquery()
    )
    stmt = (
        select(complete.c.uid, complete.c.last)
        .outerjoin(SeriesVerdictRow, SeriesVerdictRow.series_instance_uid == complete.c.uid)
        .where(
            or_(
                SeriesVerdictRow.id.is_(None),
                SeriesVerdictRow.last_received_at < complete.c.last,
            )
        )
        .order_by(complete.c.last)
        .limit(limit)
    )
    return [QuietSeries(uid, last_at) for uid, last_at in session.execute(stmt).all()]


def series_results(session: Session, *, series_uid: str) -> list[tuple[Instance, Result | None]]:
    """The newest version of every image of the series, with its result."""
    rows = session.execute(
        select(Instance, Result)
        .outerjoin(Result, Result.instance_id == Instance.id)
        .where(Instance.series_instance_uid == series_uid)
        .order_by(Instance.sop_instance_uid, Instance.version.desc())
    ).all()
    newest: dict[str, tuple[Instance, Result | None]] = {}
    for instance, result in rows:
        newest.setdefault(instance.sop_instance_uid, (instance, result))
    return list(newest.values())


def save_series_verdict(session: Session, *, row: SeriesVerdictRow) -> SeriesVerdictRow | None:
    """Insert the series' verdict, or revise the one decided before the series' last image.

    Its alerts follow it (``storage.alerts.sync_series_alerts``). Returns the stored row, or
    None where another worker has already judged the series as it stands. A concurrent first
    insert by another worker raises IntegrityError; the caller rolls back and moves on."""
    existing = session.scalar(
        select(SeriesVerdictRow).where(
            SeriesVerdictRow.series_instance_uid == row.series_instance_uid
        )
    )
    if existing is None:
        session.add(row)
        session.flush()
        sync_series_alerts(session, row=row, by=row.decided_by)
        return row
    values = {
        c.key: getattr(row, c.key)
        for c in SeriesVerdictRow.__table__.columns
        if c.key not in ("id", "revision", "decided_at")
    }
    revised = session.execute(
        update(SeriesVerdictRow)
        .where(
            SeriesVerdictRow.id == existing.id,
            SeriesVerdictRow.last_received_at < row.last_received_at,
        )
        .values(**values, decided_at=utcnow(), revision=SeriesVerdictRow.revision + 1)
        # the row is refreshed below; comparing times in Python would meet SQLite's naive
        # datetimes beside aware ones
        .execution_options(synchronize_session=False)
    )
    if revised.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(existing)
    sync_series_alerts(session, row=existing, by=existing.decided_by)
    return existing
