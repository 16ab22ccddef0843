"""A worker: claims jobs from the SQL queue, runs the pipeline, stores one result per job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.runner import PipelineConfig, PipelineResult, run_pipeline
from storage import audit
from storage.repository import ClaimedJob, JobOutcome, append_audit, claim_jobs, finish_job

log = logging.getLogger(__name__)


def job_outcome(result: PipelineResult, config: PipelineConfig) -> JobOutcome:
    """The result row's content for a pipeline run."""
    before, after = result.stats()
    decoded = result.decoded
    return JobOutcome(
        ok=result.ok,
        parameters=config.as_parameters(),
        timings_ms=result.timings_ms,
        failed_stage=result.failed_stage,
        failure_reason=result.failure_reason,
        shape=list(decoded.frames.shape) if decoded is not None else None,
        frames_total=decoded.frames_total if decoded is not None else None,
        frames_analysed=list(decoded.frames_analysed) if decoded is not None else None,
        photometric=decoded.photometric if decoded is not None else None,
        stats_decoded=before.__dict__ if before is not None else None,
        stats_clahe=after.__dict__ if after is not None else None,
    )


class Worker:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        config: PipelineConfig,
        name: str,
        spool_root: Path,
        batch_size: int = 8,
        lease_s: float = 300.0,
        max_attempts: int = 3,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.config = config
        self.name = name
        self.spool_root = spool_root
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.processed = 0

    def claim(self) -> list[ClaimedJob]:
        with self.sessions.begin() as session:
            return claim_jobs(
                session,
                worker=self.name,
                limit=self.batch_size,
                lease_s=self.lease_s,
                max_attempts=self.max_attempts,
            )

    def process(self, job: ClaimedJob) -> bool:
        result = run_pipeline(self.spool_root / job.spool_path, self.config)
        outcome = job_outcome(result, self.config)
        with self.sessions.begin() as session:
            stored = finish_job(session, job=job, worker=self.name, outcome=outcome)
            if stored and not outcome.ok:
                append_audit(
                    session,
                    record=audit.AuditRecord(
                        kind=audit.PROCESSING_FAILED,
                        outcome=audit.Outcome.MINOR_FAILURE,
                        actor_user=self.name,
                        patient_id=job.patient_id,
                        study_instance_uid=job.study_instance_uid,
                        detail={
                            "sop_instance_uid": job.sop_instance_uid,
                            "stage": outcome.failed_stage,
                            "reason": outcome.failure_reason,
                        },
                    ),
                )
        if not stored:
            log.warning("job %s: lease lost to another worker; result discarded", job.job_id)
        return stored

    def run_once(self) -> int:
        """Claim and process one batch; the number of jobs claimed."""
        jobs = self.claim()
        for job in jobs:
            if self.process(job):
                self.processed += 1
        return len(jobs)

    def run(self, should_stop: Callable[[], bool]) -> None:
        log.info("worker %s started", self.name)
        while not should_stop():
            try:
                claimed = self.run_once()
            except SQLAlchemyError as exc:
                log.error("worker %s: database error, retrying: %s", self.name, exc)
                claimed = 0
                time.sleep(min(5.0, self.poll_interval_s * 4))
            if claimed == 0:
                time.sleep(self.poll_interval_s)
        log.info("worker %s stopped after %d jobs", self.name, self.processed)
