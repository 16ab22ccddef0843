"""The job queue: claims under a lease, release, and finishing a job with its result (and
the alerts its mismatches raise, in the same transaction)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from storage.alerts import MISMATCH, FlaggedEmbedding, FlaggedImage, raise_image_alerts
from storage.models import (
    Instance,
    InstanceState,
    Job,
    JobState,
    Result,
    utcnow,
)


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
    """What a worker stores for a finished job: the result row's columns, named as they are
    (``ok`` aside, which is its status)."""

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
    identity_margin: float | None = None
    identity_header_score: float | None = None
    identity_verdict: str | None = None
    matched_patient_id: str | None = None
    model_versions: dict[str, str] | None = None
    identity_reason: str | None = None
    priors: list[dict[str, Any]] | None = None
    awaiting_priors: bool = False

    def columns(self) -> dict[str, Any]:
        """The result row's columns this outcome holds."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ok"}


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


def finish_job(
    session: Session,
    *,
    job: ClaimedJob,
    worker: str,
    outcome: JobOutcome,
    embedding: FlaggedEmbedding | None = None,
) -> bool:
    """Store the job's single result and close it, if this worker still holds it. A patient
    mismatch's alert keeps ``embedding``, the image's, for a reviewer who may enroll it.

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
    result = Result(
        job_id=job.job_id,
        instance_id=job.instance_id,
        status="ok" if outcome.ok else "failed",
        worker=worker,
        **outcome.columns(),
    )
    session.add(result)
    if MISMATCH in (outcome.modality_verdict, outcome.identity_verdict):
        _raise_alerts(session, result, job, embedding, worker)
    session.execute(
        update(Instance)
        .where(Instance.id == job.instance_id)
        .values(state=InstanceState.PROCESSED if outcome.ok else InstanceState.FAILED)
    )
    session.flush()
    return True


def _raise_alerts(
    session: Session,
    result: Result,
    job: ClaimedJob,
    embedding: FlaggedEmbedding | None,
    worker: str,
    kinds: tuple[str, ...] = ("modality", "identity"),
) -> None:
    session.flush()  # the result's id, for its alerts
    series = session.scalar(
        select(Instance.series_instance_uid).where(Instance.id == job.instance_id)
    )
    raise_image_alerts(
        session,
        result=result,
        image=FlaggedImage(
            patient_id=job.patient_id,
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=series,
            sop_instance_uid=job.sop_instance_uid,
            header_modality=job.modality,
            embedding=embedding,
        ),
        by=worker,
        kinds=kinds,
    )


# What judging an image again (once its priors are had) may change of its result.
IDENTITY_COLUMNS = (
    "top_matches",
    "identity_threshold",
    "identity_margin",
    "identity_header_score",
    "identity_verdict",
    "matched_patient_id",
    "identity_reason",
    "priors",
    "awaiting_priors",
)


def judge_again(
    session: Session,
    *,
    result_id: int,
    job: ClaimedJob,
    outcome: JobOutcome,
    worker: str,
    embedding: FlaggedEmbedding | None = None,
) -> bool:
    """Replace a result's identity verdict, given while it waited for priors, by the one its
    priors give, raising a patient mismatch's alert. Only once: False (and nothing written)
    where the result no longer waits (another worker judged it)."""
    values = {name: getattr(outcome, name) for name in IDENTITY_COLUMNS}
    changed = session.execute(
        update(Result)
        .where(Result.id == result_id, Result.awaiting_priors.is_(True))
        .values(**values, judged_again_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    if outcome.identity_verdict == MISMATCH:
        result = session.get_one(Result, result_id)
        session.refresh(result)
        _raise_alerts(session, result, job, embedding, worker, kinds=("identity",))
    session.flush()
    return True
