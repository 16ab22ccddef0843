"""A worker: claims jobs from the SQL queue, runs the pipeline, stores one result per job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.analysis import Analysis, HeaderFacts
from pipeline.modelstore import Analyser, embedding_bytes
from pipeline.runner import PipelineConfig, PipelineResult, run_pipeline
from storage import audit
from storage.repository import (
    ClaimedJob,
    JobOutcome,
    NewGalleryEntry,
    add_gallery_entries,
    append_audit,
    claim_jobs,
    finish_job,
)

log = logging.getLogger(__name__)


def job_outcome(
    result: PipelineResult, config: PipelineConfig, analysis: Analysis | None = None
) -> JobOutcome:
    """The result row's content for a pipeline run (and the models' analysis, if any)."""
    before, after = result.stats()
    decoded = result.decoded
    identity = analysis.identity if analysis is not None else None
    return JobOutcome(
        predicted_modality=analysis.predicted_modality if analysis else None,
        modality_scores=analysis.modality_scores if analysis else None,
        modality_verdict=str(analysis.modality_verdict)
        if analysis and analysis.modality_verdict
        else None,
        routed_to=analysis.routed_to if analysis else None,
        top_matches=analysis.top_matches if analysis else None,
        identity_threshold=analysis.threshold if analysis else None,
        identity_verdict=str(identity.verdict) if identity else None,
        matched_patient_id=identity.matched_patient if identity else None,
        model_versions=analysis.versions if analysis else None,
        ok=result.ok,
        parameters=config.as_parameters(),
        timings_ms=result.timings_ms,
        failed_stage=result.failed_stage,
        failure_reason=result.failure_reason or ("; ".join(result.notes) or None),
        shape=list(decoded.frames.shape) if decoded is not None else None,
        frames_total=decoded.frames_total if decoded is not None else None,
        frames_analysed=list(decoded.frames_analysed) if decoded is not None else None,
        photometric=decoded.photometric if decoded is not None else None,
        stats_decoded=before.__dict__ if before is not None else None,
        stats_clahe=after.__dict__ if after is not None else None,
    )


def audit_records(job: ClaimedJob, outcome: JobOutcome, worker: str) -> list[audit.AuditRecord]:
    """Failures and mismatches a person must see, as audit events."""

    def event(kind: audit.EventKind, **detail: object) -> audit.AuditRecord:
        return audit.AuditRecord(
            kind=kind,
            outcome=audit.Outcome.MINOR_FAILURE,
            actor_user=worker,
            patient_id=job.patient_id,
            study_instance_uid=job.study_instance_uid,
            detail={"sop_instance_uid": job.sop_instance_uid, **detail},
        )

    records = []
    if not outcome.ok:
        records.append(
            event(
                audit.PROCESSING_FAILED, stage=outcome.failed_stage, reason=outcome.failure_reason
            )
        )
    if outcome.modality_verdict == "mismatch":
        records.append(
            event(
                audit.MODALITY_MISMATCH,
                header_modality=job.modality,
                predicted=outcome.predicted_modality,
                scores=outcome.modality_scores,
            )
        )
    if outcome.identity_verdict == "mismatch":
        records.append(
            event(
                audit.PATIENT_MISMATCH,
                header_patient=job.patient_id,
                looks_like=outcome.matched_patient_id,
                top_matches=outcome.top_matches,
                threshold=outcome.identity_threshold,
            )
        )
    return records


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
        analyser: Analyser | None = None,
        auto_enroll: bool = False,
    ) -> None:
        self.sessions = sessions
        self.config = config
        self.name = name
        self.spool_root = spool_root
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.analyser = analyser
        self.auto_enroll = auto_enroll
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

    def analyse(self, jobs: list[ClaimedJob], results: list[PipelineResult]) -> dict[int, Analysis]:
        """The models over every decoded image of the batch at once."""
        if self.analyser is None:
            return {}
        ready = [(j, r) for j, r in zip(jobs, results, strict=True) if r.enhanced is not None]
        if not ready:
            return {}
        started = time.perf_counter()
        try:
            self.analyser.refresh()
            analyses = self.analyser.analyse(
                [r.enhanced[0] for _, r in ready if r.enhanced is not None],
                [HeaderFacts(j.patient_id, j.modality) for j, _ in ready],
            )
        except SQLAlchemyError:
            raise  # the database is away: the batch is retried when it returns
        except Exception as exc:
            # A model that fails must not stop the service: the images keep their decode and
            # CLAHE results, without verdicts, and the reason is in the log and the result.
            log.exception("models failed on a batch of %d images", len(ready))
            for _, result in ready:
                result.timings_ms["models_failed"] = 1.0
                result.notes.append(f"models failed: {type(exc).__name__}: {exc}")
            return {}
        per_image = round((time.perf_counter() - started) * 1000.0 / len(ready), 3)
        for _, result in ready:
            result.timings_ms["models"] = per_image
        return {j.job_id: a for (j, _), a in zip(ready, analyses, strict=True)}

    def process(
        self,
        job: ClaimedJob,
        result: PipelineResult | None = None,
        analysis: Analysis | None = None,
    ) -> bool:
        if result is None:
            result = run_pipeline(self.spool_root / job.spool_path, self.config)
        outcome = job_outcome(result, self.config, analysis)
        with self.sessions.begin() as session:
            stored = finish_job(session, job=job, worker=self.name, outcome=outcome)
            if stored:
                for record in audit_records(job, outcome, self.name):
                    append_audit(session, record=record)
                if self.auto_enroll and analysis is not None:
                    self._enroll_new_patient(session, job, analysis)
        if not stored:
            log.warning("job %s: lease lost to another worker; result discarded", job.job_id)
        return stored

    def _enroll_new_patient(self, session: Session, job: ClaimedJob, analysis: Analysis) -> None:
        """The auto-enrollment policy: a new patient's image joins the gallery."""
        identity = analysis.identity
        modality = analysis.routed_to
        if (
            identity is None
            or identity.verdict != "new_patient"
            or analysis.embedding is None
            or modality is None
            or not job.patient_id
        ):
            return
        version = analysis.versions.get(f"reid:{modality}")
        if version is None:
            return
        add_gallery_entries(
            session,
            entries=[
                NewGalleryEntry(
                    patient_id=job.patient_id,
                    modality=modality,
                    model_version=version,
                    embedding=embedding_bytes(analysis.embedding),
                    source_instance_id=job.instance_id,
                    source_path=None,
                    enrolled_by=self.name,
                )
            ],
        )
        append_audit(
            session,
            record=audit.AuditRecord(
                kind=audit.GALLERY_ENROLLMENT,
                actor_user=self.name,
                patient_id=job.patient_id,
                study_instance_uid=job.study_instance_uid,
                detail={
                    "policy": "auto_enroll_new_patients",
                    "model": version,
                    "sop_instance_uid": job.sop_instance_uid,
                },
            ),
        )

    def run_once(self) -> int:
        """Claim and process one batch; the number of jobs claimed."""
        jobs = self.claim()
        results = [run_pipeline(self.spool_root / job.spool_path, self.config) for job in jobs]
        analyses = self.analyse(jobs, results)
        for job, result in zip(jobs, results, strict=True):
            if self.process(job, result, analyses.get(job.job_id)):
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
