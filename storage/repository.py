"""Repository functions. Each takes ``session`` keyword-only and never commits:
the caller owns the transaction (``with Session.begin() as session: ...``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from storage.audit import AuditRecord, Outcome
from storage.models import (
    ActiveModel,
    Association,
    AssociationOutcome,
    AuditEvent,
    GalleryEntry,
    Instance,
    InstanceState,
    Job,
    JobState,
    Result,
    SeriesVerdictRow,
    utcnow,
)

# --------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class NewInstance:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    patient_id: str | None
    modality: str | None
    transfer_syntax_uid: str
    size_bytes: int
    sha256: str
    calling_ae: str
    peer_host: str
    association_id: int | None


# The receive path's statements, built once: executed with parameters, they compile once and
# skip the ORM's per-statement work (about 2 ms an instance on SQLite).
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_VERSIONS_OF_UID = select(_INSTANCES.c.sha256, _INSTANCES.c.version).where(
    _INSTANCES.c.sop_instance_uid == bindparam("uid")
)
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_JOBS: Table = Job.__table__  # type: ignore[assignment]
_INSERT_JOB = insert(_JOBS)


def stored_versions(session: Session, *, sop_instance_uid: str) -> dict[str, int]:
    """Content hash -> version of every stored version of one SOP instance (one query; the
    receive path asks it for every instance)."""
    rows = session.execute(_VERSIONS_OF_UID, {"uid": sop_instance_uid})
    return {sha256: version for sha256, version in rows}


def recorded_spool_paths(session: Session, *, sop_instance_uids: Iterable[str]) -> set[str]:
    """The spool paths recorded for any version of these SOP Instance UIDs."""
    uids = sorted(set(sop_instance_uids))
    paths: set[str] = set()
    for start in range(0, len(uids), 500):
        paths.update(
            session.scalars(
                select(Instance.spool_path).where(
                    Instance.sop_instance_uid.in_(uids[start : start + 500])
                )
            )
        )
    return paths


def record_instance(session: Session, *, new: NewInstance, version: int, spool_path: str) -> int:
    """Record a received instance version and queue its job; the new instance's id.

    Core inserts of prepared statements, not the ORM: this runs once per received instance."""
    now = utcnow()
    instance_id = session.execute(
        _INSERT_INSTANCE,
        {
            **dataclasses.asdict(new),  # its fields are the columns of the same names
            "version": version,
            "spool_path": spool_path,
            "state": InstanceState.QUEUED.value,
            "received_at": now,
        },
    ).scalar_one()
    session.execute(
        _INSERT_JOB,
        {
            "instance_id": instance_id,
            "state": JobState.PENDING.value,
            "created_at": now,
            "attempts": 0,
        },
    )
    return int(instance_id)


def add_instance_with_job(
    session: Session, *, new: NewInstance, version: int, spool_path: str
) -> Instance:
    """Record a received instance version and queue its job (one transaction, the caller's)."""
    instance = session.get(
        Instance, record_instance(session, new=new, version=version, spool_path=spool_path)
    )
    assert instance is not None
    return instance


# --------------------------------------------------------------------------- associations


def open_association(
    session: Session, *, calling_ae: str, called_ae: str, peer_host: str, peer_port: int
) -> int:
    row = Association(
        calling_ae=calling_ae, called_ae=called_ae, peer_host=peer_host, peer_port=peer_port
    )
    session.add(row)
    session.flush()
    return row.id


def close_association(
    session: Session,
    *,
    association_id: int,
    outcome: AssociationOutcome,
    stored: int,
    failed: int,
    bytes_stored: int,
    reason: str | None = None,
) -> None:
    session.execute(
        update(Association)
        .where(Association.id == association_id)
        .values(
            outcome=outcome,
            ended_at=utcnow(),
            instances_stored=stored,
            instances_failed=failed,
            bytes_stored=bytes_stored,
            reason=reason,
        )
    )


# --------------------------------------------------------------------------- audit


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


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    instance_id: int
    attempt: int
    spool_path: str
    sop_instance_uid: str
    patient_id: str | None
    study_instance_uid: str | None
    modality: str | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What a worker stores for a finished job."""

    ok: bool
    parameters: dict[str, Any]
    timings_ms: dict[str, float]
    failed_stage: str | None = None
    failure_reason: str | None = None
    shape: list[int] | None = None
    frames_total: int | None = None
    frames_analysed: list[int] | None = None
    photometric: str | None = None
    stats_decoded: dict[str, float] | None = None
    stats_clahe: dict[str, float] | None = None
    predicted_modality: str | None = None
    modality_scores: dict[str, float] | None = None
    modality_verdict: str | None = None
    routed_to: str | None = None
    top_matches: list[dict[str, Any]] | None = None
    identity_threshold: float | None = None
    identity_header_score: float | None = None
    identity_verdict: str | None = None
    matched_patient_id: str | None = None
    model_versions: dict[str, str] | None = None


def release_jobs_of(session: Session, *, claimant_prefix: str) -> int:
    """Put back the running jobs of a node whose workers are known dead (a restart)."""
    result = session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING, Job.claimed_by.startswith(claimant_prefix))
        .values(state=JobState.PENDING, lease_expires_at=None)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def claim_jobs(
    session: Session, *, worker: str, limit: int, lease_s: float, max_attempts: int
) -> list[ClaimedJob]:
    """Claim up to ``limit`` jobs: pending ones, or running ones whose lease ran out.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets workers on many hosts claim side by side;
    on SQLite the transaction began IMMEDIATE, which serialises claimers on one node.
    A job whose workers died ``max_attempts`` times is failed instead of claimed again.
    """
    now = utcnow()
    candidates = session.execute(
        select(Job.id, Job.attempts, Job.instance_id)
        .where(
            or_(
                Job.state == JobState.PENDING,
                and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
            )
        )
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    claimable: list[int] = []
    for job_id, attempts, instance_id in candidates:
        if attempts >= max_attempts:
            _fail_abandoned_job(session, job_id=job_id, instance_id=instance_id, attempts=attempts)
        else:
            claimable.append(job_id)
    if not claimable:
        return []
    session.execute(
        update(Job)
        .where(Job.id.in_(claimable))
        .values(
            state=JobState.RUNNING,
            attempts=Job.attempts + 1,
            claimed_by=worker,
            claimed_at=now,
            lease_expires_at=now + dt.timedelta(seconds=lease_s),
        )
    )
    rows = session.execute(
        select(
            Job.id,
            Job.instance_id,
            Job.attempts,
            Instance.spool_path,
            Instance.sop_instance_uid,
            Instance.patient_id,
            Instance.study_instance_uid,
            Instance.modality,
        )
        .join(Instance, Instance.id == Job.instance_id)
        .where(Job.id.in_(claimable))
        .order_by(Job.id)
    ).all()
    return [ClaimedJob(*row) for row in rows]


def _fail_abandoned_job(session: Session, *, job_id: int, instance_id: int, attempts: int) -> None:
    reason = f"abandoned: its worker stopped {attempts} times while processing it"
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=JobState.FAILED, finished_at=utcnow(), error=reason)
    )
    session.execute(
        update(Instance).where(Instance.id == instance_id).values(state=InstanceState.FAILED)
    )
    session.add(
        Result(
            job_id=job_id,
            instance_id=instance_id,
            status="failed",
            failed_stage="worker",
            failure_reason=reason,
            parameters={},
            timings_ms={},
            worker="claim",
        )
    )


def finish_job(session: Session, *, job: ClaimedJob, worker: str, outcome: JobOutcome) -> bool:
    """Store the job's single result and close it, if this worker still holds it.

    Returns False (and writes nothing) when the lease was lost to another worker.
    """
    state = JobState.DONE if outcome.ok else JobState.FAILED
    closed = session.execute(
        update(Job)
        .where(Job.id == job.job_id, Job.claimed_by == worker, Job.state == JobState.RUNNING)
        .values(
            state=state,
            finished_at=utcnow(),
            error=None if outcome.ok else outcome.failure_reason,
        )
    )
    if closed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(
        Result(
            job_id=job.job_id,
            instance_id=job.instance_id,
            status="ok" if outcome.ok else "failed",
            failed_stage=outcome.failed_stage,
            failure_reason=outcome.failure_reason,
            shape=outcome.shape,
            frames_total=outcome.frames_total,
            frames_analysed=outcome.frames_analysed,
            photometric=outcome.photometric,
            stats_decoded=outcome.stats_decoded,
            stats_clahe=outcome.stats_clahe,
            parameters=outcome.parameters,
            timings_ms=outcome.timings_ms,
            worker=worker,
            predicted_modality=outcome.predicted_modality,
            modality_scores=outcome.modality_scores,
            modality_verdict=outcome.modality_verdict,
            routed_to=outcome.routed_to,
            top_matches=outcome.top_matches,
            identity_threshold=outcome.identity_threshold,
            identity_header_score=outcome.identity_header_score,
            identity_verdict=outcome.identity_verdict,
            matched_patient_id=outcome.matched_patient_id,
            model_versions=outcome.model_versions,
        )
    )
    session.execute(
        update(Instance)
        .where(Instance.id == job.instance_id)
        .values(state=InstanceState.PROCESSED if outcome.ok else InstanceState.FAILED)
    )
    session.flush()
    return True


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class InstanceFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    state: str | None = None
    ae: str | None = None
    patient: str | None = None
    study: str | None = None
    limit: int = 1000


def list_instances(
    session: Session, *, where: InstanceFilter
) -> list[tuple[Instance, Result | None]]:
    """Instances with their latest result (if any), oldest first."""
    newer = aliased(Result)
    latest_result = (
        select(func.max(newer.id))
        .where(newer.instance_id == Instance.id)
        .correlate(Instance)
        .scalar_subquery()
    )
    stmt = select(Instance, Result).outerjoin(Result, Result.id == latest_result)
    if where.since is not None:
        stmt = stmt.where(Instance.received_at >= where.since)
    if where.until is not None:
        stmt = stmt.where(Instance.received_at < where.until)
    if where.state:
        stmt = stmt.where(Instance.state == where.state)
    if where.ae:
        stmt = stmt.where(Instance.calling_ae == where.ae)
    if where.patient:
        stmt = stmt.where(Instance.patient_id == where.patient)
    if where.study:
        stmt = stmt.where(Instance.study_instance_uid == where.study)
    stmt = stmt.order_by(Instance.id.desc()).limit(where.limit)
    rows: list[tuple[Instance, Result | None]] = [
        (inst, res) for inst, res in session.execute(stmt).all()
    ]
    rows.reverse()
    return rows


# --------------------------------------------------------------------------- gallery


@dataclass(frozen=True)
class NewGalleryEntry:
    patient_id: str
    modality: str
    model_version: str
    embedding: bytes  # float32, little-endian
    source_instance_id: int | None
    source_path: str | None
    enrolled_by: str


def add_gallery_entries(session: Session, *, entries: list[NewGalleryEntry]) -> int:
    session.add_all(
        GalleryEntry(
            patient_id=e.patient_id,
            modality=e.modality,
            model_version=e.model_version,
            embedding=e.embedding,
            source_instance_id=e.source_instance_id,
            source_path=e.source_path,
            enrolled_by=e.enrolled_by,
        )
        for e in entries
    )
    session.flush()
    return len(entries)


def gallery_after(
    session: Session, *, model_version: str, after_id: int
) -> list[tuple[int, str, bytes]]:
    """Entries of one model version newer than ``after_id``: (id, patient, embedding)."""
    rows = session.execute(
        select(GalleryEntry.id, GalleryEntry.patient_id, GalleryEntry.embedding)
        .where(GalleryEntry.model_version == model_version, GalleryEntry.id > after_id)
        .order_by(GalleryEntry.id)
    ).all()
    return [(int(i), str(p), bytes(e)) for i, p, e in rows]


# --------------------------------------------------------------------------- models


def active_models(session: Session) -> dict[str, tuple[str, str]]:
    """slot -> (version, path) of the activated models."""
    rows = session.execute(select(ActiveModel.slot, ActiveModel.version, ActiveModel.path)).all()
    return {str(slot): (str(version), str(path)) for slot, version, path in rows}


def activate_model(session: Session, *, slot: str, version: str, path: str, by: str) -> None:
    existing = session.get(ActiveModel, slot)
    if existing is None:
        session.add(ActiveModel(slot=slot, version=version, path=path, activated_by=by))
    else:
        existing.version, existing.path, existing.activated_by = version, path, by
        existing.activated_at = utcnow()
    session.flush()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultFilter:
    since: dt.datetime | None = None
    verdict: str | None = None  # a modality or identity verdict
    study: str | None = None
    patient: str | None = None
    limit: int = 1000


def list_results(session: Session, *, where: ResultFilter) -> list[tuple[Result, Instance]]:
    stmt = select(Result, Instance).join(Instance, Instance.id == Result.instance_id)
    if where.since is not None:
        stmt = stmt.where(Result.created_at >= where.since)
    if where.verdict:
        stmt = stmt.where(
            or_(Result.identity_verdict == where.verdict, Result.modality_verdict == where.verdict)
        )
    if where.study:
        stmt = stmt.where(Instance.study_instance_uid == where.study)
    if where.patient:
        stmt = stmt.where(
            or_(Instance.patient_id == where.patient, Result.matched_patient_id == where.patient)
        )
    stmt = stmt.order_by(Result.id.desc()).limit(where.limit)
    rows = [(r, i) for r, i in session.execute(stmt).all()]
    rows.reverse()
    return rows


# --------------------------------------------------------------------------- series


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

    Complete: the last image arrived before ``quiet_before`` and every job of the series is
    finished. Not judged as they stand: no verdict yet, or one decided before the last image.
    Only series with an image received within ``lookback`` before ``quiet_before`` are
    considered, so the query reads recent rows, not the whole archive."""
    unfinished = (
        select(Instance.series_instance_uid)
        .join(Job, Job.instance_id == Instance.id)
        .where(Job.state.in_([JobState.PENDING, JobState.RUNNING]))
        .where(Instance.series_instance_uid.is_not(None))
    )
    last = func.max(Instance.received_at)
    complete = (
        select(Instance.series_instance_uid.label("uid"), last.label("last"))
        .where(Instance.modality.in_(list(modalities)))
        .where(Instance.received_at >= quiet_before - lookback)
        .where(Instance.series_instance_uid.is_not(None))
        .where(Instance.series_instance_uid.not_in(unfinished))
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

    Returns the stored row, or None where another worker has already judged the series as it
    stands. A concurrent first insert by another worker raises IntegrityError; the caller
    rolls back and moves on."""
    existing = session.scalar(
        select(SeriesVerdictRow).where(
            SeriesVerdictRow.series_instance_uid == row.series_instance_uid
        )
    )
    if existing is None:
        session.add(row)
        session.flush()
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
    )
    if revised.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(existing)
    return existing


def list_series_verdicts(session: Session, *, where: ResultFilter) -> list[SeriesVerdictRow]:
    stmt = select(SeriesVerdictRow)
    if where.since is not None:
        stmt = stmt.where(SeriesVerdictRow.decided_at >= where.since)
    if where.verdict:
        stmt = stmt.where(
            or_(
                SeriesVerdictRow.identity_verdict == where.verdict,
                SeriesVerdictRow.modality_verdict == where.verdict,
            )
        )
    if where.study:
        stmt = stmt.where(SeriesVerdictRow.study_instance_uid == where.study)
    if where.patient:
        stmt = stmt.where(
            or_(
                SeriesVerdictRow.patient_id == where.patient,
                SeriesVerdictRow.matched_patient_id == where.patient,
            )
        )
    rows = list(session.scalars(stmt.order_by(SeriesVerdictRow.id.desc()).limit(where.limit)))
    rows.reverse()
    return rows


__all__ = [
    "AssociationOutcome",
    "AuditFilter",
    "ClaimedJob",
    "InstanceFilter",
    "JobOutcome",
    "NewInstance",
    "add_instance_with_job",
    "append_audit",
    "claim_jobs",
    "close_association",
    "finish_job",
    "list_instances",
    "open_association",
    "query_audit",
    "record_instance",
    "release_jobs_of",
    "stored_versions",
]
