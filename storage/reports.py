"""Read-only queries behind the console: one result, the dashboard's counts (paged results
and series are ``storage.results``')."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Integer, cast, func, or_, select
from sqlalchemy.orm import Session

from storage.alerts import MISMATCH
from storage.models import (
    ActiveModel,
    Alert,
    AlertScope,
    AlertState,
    Instance,
    Job,
    JobState,
    Result,
    SeriesVerdictRow,
)

# The dashboard's recent past: failed jobs and mismatch rates per sender.
RECENT_WINDOW = dt.timedelta(days=7)


def result_detail(session: Session, *, result_id: int) -> tuple[Result, Instance] | None:
    row = session.execute(
        select(Result, Instance)
        .join(Instance, Instance.id == Result.instance_id)
        .where(Result.id == result_id)
    ).first()
    return (row[0], row[1]) if row is not None else None


def series_verdict_of(session: Session, *, series_uid: str | None) -> SeriesVerdictRow | None:
    if not series_uid:
        return None
    return session.scalar(
        select(SeriesVerdictRow).where(SeriesVerdictRow.series_instance_uid == series_uid)
    )


@dataclass
class Dashboard:
    received_today: int = 0
    received_week: int = 0
    today_by_modality: dict[str, int] = field(default_factory=dict)
    week_by_modality: dict[str, int] = field(default_factory=dict)
    today_by_sender: dict[str, int] = field(default_factory=dict)
    week_by_sender: dict[str, int] = field(default_factory=dict)
    open_image_alerts: int = 0  # alerts of images no reviewer has decided yet
    open_series_alerts: int = 0
    queue_pending: int = 0
    queue_running: int = 0
    failed_recently: int = 0  # jobs failed in the alert window
    active_models: dict[str, str] = field(default_factory=dict)  # slot -> version
    models_in_use: dict[str, str] = field(default_factory=dict)  # of the newest result
    arrivals_by_hour: list[tuple[dt.datetime, int]] = field(default_factory=list)
    # sender AE -> (results, mismatches) in the alert window
    mismatch_by_sender: dict[str, tuple[int, int]] = field(default_factory=dict)


def _grouped(session: Session, column: Any, since: dt.datetime) -> dict[str, int]:
    rows = session.execute(
        select(column, func.count())
        .where(Instance.received_at >= since)
        .group_by(column)
        .order_by(func.count().desc())
    ).all()
    return {str(key) if key is not None else "(none)": int(n) for key, n in rows}


def _hour_of(session: Session) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc("hour", func.timezone("UTC", Instance.received_at))
    return func.strftime("%Y-%m-%d %H:00:00", Instance.received_at)


def _mismatch() -> ColumnElement[bool]:
    return or_(Result.modality_verdict == MISMATCH, Result.identity_verdict == MISMATCH)


def open_alerts(session: Session) -> tuple[int, int]:
    """Alerts no reviewer has decided yet: of images, of series."""
    counted = dict(
        session.execute(
            select(Alert.scope, func.count())
            .where(Alert.state == AlertState.OPEN)
            .group_by(Alert.scope)
        ).all()
    )
    return int(counted.get(AlertScope.IMAGE, 0)), int(counted.get(AlertScope.SERIES, 0))


@dataclass(frozen=True)
class QueueState:
    pending: int
    running: int
    oldest_pending_at: dt.datetime | None  # when the oldest pending job was queued


def queue_state(session: Session) -> QueueState:
    states = dict(
        session.execute(
            select(Job.state, func.count())
            .where(Job.state.in_([JobState.PENDING, JobState.RUNNING]))
            .group_by(Job.state)
        ).all()
    )
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.PENDING))
    return QueueState(
        pending=int(states.get(JobState.PENDING, 0)),
        running=int(states.get(JobState.RUNNING, 0)),
        oldest_pending_at=oldest,
    )


def dashboard(
    session: Session,
    *,
    now: dt.datetime,
    day_start: dt.datetime,
    week_start: dt.datetime,
    recent_window: dt.timedelta = RECENT_WINDOW,
    hours: int = 48,
) -> Dashboard:
    board = Dashboard()
    board.today_by_modality = _grouped(session, Instance.modality, day_start)
    board.week_by_modality = _grouped(session, Instance.modality, week_start)
    board.today_by_sender = _grouped(session, Instance.calling_ae, day_start)
    board.week_by_sender = _grouped(session, Instance.calling_ae, week_start)
    board.received_today = sum(board.today_by_modality.values())
    board.received_week = sum(board.week_by_modality.values())

    board.open_image_alerts, board.open_series_alerts = open_alerts(session)
    recent_since = now - recent_window
    queue = queue_state(session)
    board.queue_pending, board.queue_running = queue.pending, queue.running
    board.failed_recently = int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.state == JobState.FAILED, Job.finished_at >= recent_since)
        )
        or 0
    )
    board.active_models = {
        str(slot): str(version)
        for slot, version in session.execute(
            select(ActiveModel.slot, ActiveModel.version).order_by(ActiveModel.slot)
        ).all()
    }
    # The newest result that ran models says which versions the workers use now.
    for versions in session.scalars(
        select(Result.model_versions).order_by(Result.id.desc()).limit(50)
    ):
        if versions:
            board.models_in_use = {str(k): str(v) for k, v in versions.items()}
            break

    first_hour = (now - dt.timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
    hour = _hour_of(session)
    counted = {
        _as_hour(key): int(n)
        for key, n in session.execute(
            select(hour, func.count()).where(Instance.received_at >= first_hour).group_by(hour)
        ).all()
    }
    board.arrivals_by_hour = [
        (first_hour + dt.timedelta(hours=h), counted.get(first_hour + dt.timedelta(hours=h), 0))
        for h in range(hours)
    ]
    mismatches = func.sum(cast(_mismatch(), Integer))
    board.mismatch_by_sender = {
        str(ae): (int(total), int(bad or 0))
        for ae, total, bad in session.execute(
            select(Instance.calling_ae, func.count(), mismatches)
            .select_from(Result)
            .join(Instance, Instance.id == Result.instance_id)
            .where(Result.created_at >= recent_since, Result.status == "ok")
            .group_by(Instance.calling_ae)
            .order_by(Instance.calling_ae)
        ).all()
    }
    return board


def _as_hour(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
