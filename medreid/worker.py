"""The worker (application layer): claims jobs from the SQL queue, runs the pipeline,
stores one result per job."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from medreid.priors import PriorsCheck, PriorsFetcher, PriorsWanted
from medreid.series import (
    SeriesHeader,
    SeriesPolicy,
    mismatch_alerts,
    series_audit_records,
    series_row,
    worker_event,
)
from pipeline.analysis import Analysis, HeaderFacts
from pipeline.modelstore import Analyser, embedding_bytes
from pipeline.ports import NoObserver, WorkerObserver
from pipeline.runner import PipelineConfig, PipelineResult, run_pipeline
from pipeline.series import ImageFinding, aggregate_series
from pipeline.verdicts import IdentityDecision, IdentityVerdict
from storage import audit
from storage.alerts import FlaggedEmbedding
from storage.audit_trail import append_audit
from storage.gallery import NewGalleryEntry, add_gallery_entries
from storage.jobs import ClaimedJob, JobOutcome, claim_jobs, finish_job, judge_again
from storage.models import PriorFetchState, utcnow
from storage.priors import (
    AwaitingResult,
    awaiting_results,
    priors_held,
    stop_waiting,
    waiting_pairs,
)
from storage.results import QuietSeries, quiet_series, save_series_verdict, series_results

log = logging.getLogger(__name__)


def _text(value: str | None) -> str | None:
    """Text as a database can keep it: PostgreSQL refuses NUL, which damaged files carry."""
    return None if value is None else value.replace("\x00", "\\0")


def with_priors(analysis: Analysis | None, check: PriorsCheck | None) -> Analysis | None:
    """The analysis as the priors leave it.

    - Where they could not be had, the identity is unverifiable, whatever the gallery
      without them said.
    - Where the header patient's own PACS priors are held and the image matches none of
      them, it is a mismatch, even when it resembles nobody else: the patient's own earlier
      images are the reference, not a gallery that may lack the image's true patient."""
    check = _applied(analysis, check)
    if analysis is None or analysis.identity is None or check is None:
        return analysis
    identity = analysis.identity
    if not check.available:
        verdict = IdentityDecision(
            IdentityVerdict.UNVERIFIABLE, None, identity.best_score, identity.header_score
        )
    elif (
        check.studies
        and identity.verdict == IdentityVerdict.UNVERIFIABLE
        and identity.header_score is not None
        and analysis.threshold is not None
        and identity.header_score < analysis.threshold
    ):
        verdict = IdentityDecision(
            IdentityVerdict.MISMATCH, None, identity.best_score, identity.header_score
        )
    else:
        return analysis
    return dataclasses.replace(analysis, identity=verdict)


def _applied(analysis: Analysis | None, check: PriorsCheck | None) -> PriorsCheck | None:
    """The priors where they judge the image's identity: not where there is no identity
    verdict, nor where the pixels sent it to another modality's model than its header's."""
    if (
        analysis is None
        or analysis.identity is None
        or check is None
        or not check.applies_to(analysis.routed_to)
    ):
        return None
    return check


def job_outcome(
    result: PipelineResult,
    config: PipelineConfig,
    analysis: Analysis | None = None,
    priors: PriorsCheck | None = None,
) -> JobOutcome:
    """The result row's content for a pipeline run (and the models' analysis, if any, as
    the priors leave it)."""
    priors = _applied(analysis, priors)
    analysis = with_priors(analysis, priors)
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
        identity_margin=analysis.margin if analysis else None,
        identity_header_score=identity.header_score if identity else None,
        identity_verdict=str(identity.verdict) if identity else None,
        matched_patient_id=identity.matched_patient if identity else None,
        model_versions=analysis.versions if analysis else None,
        ok=result.ok,
        parameters=config.as_parameters(),
        timings_ms=result.timings_ms,
        failed_stage=result.failed_stage,
        failure_reason=_text(result.failure_reason or ("; ".join(result.notes) or None)),
        shape=list(decoded.frames.shape) if decoded is not None else None,
        frames_total=decoded.frames_total if decoded is not None else None,
        frames_analysed=list(decoded.frames_analysed) if decoded is not None else None,
        photometric=_text(decoded.photometric) if decoded is not None else None,
        stats_decoded=before.__dict__ if before is not None else None,
        stats_clahe=after.__dict__ if after is not None else None,
        identity_reason=priors.reason if priors is not None else None,
        priors=(priors.studies or None) if priors is not None else None,
        awaiting_priors=priors is not None and priors.wait,
    )


def _embedding(analysis: Analysis | None) -> FlaggedEmbedding | None:
    """The image's embedding under its routed model, kept with a patient mismatch's alert
    (serialised only then: most jobs raise no alert)."""
    if (
        analysis is None
        or analysis.identity is None
        or analysis.identity.verdict != IdentityVerdict.MISMATCH
        or analysis.embedding is None
        or analysis.routed_to is None
    ):
        return None
    version = analysis.versions.get(f"reid:{analysis.routed_to}")
    if version is None:
        return None
    return FlaggedEmbedding(embedding_bytes(analysis.embedding), version, analysis.routed_to)


def audit_records(job: ClaimedJob, outcome: JobOutcome, worker: str) -> list[audit.AuditRecord]:
    """Failures and mismatches a person must see, as audit events."""

    event = functools.partial(
        worker_event,
        worker=worker,
        patient_id=job.patient_id,
        study_instance_uid=job.study_instance_uid,
        sop_instance_uid=job.sop_instance_uid,
    )
    failed = (
        []
        if outcome.ok
        else [
            event(
                audit.PROCESSING_FAILED, stage=outcome.failed_stage, reason=outcome.failure_reason
            )
        ]
    )
    return failed + mismatch_alerts(
        event,
        modality_verdict=outcome.modality_verdict,
        identity_verdict=outcome.identity_verdict,
        modality={
            "header_modality": job.modality,
            "predicted": outcome.predicted_modality,
            "scores": outcome.modality_scores,
        },
        identity={
            "header_patient": job.patient_id,
            "looks_like": outcome.matched_patient_id,
            "top_matches": outcome.top_matches,
            "threshold": outcome.identity_threshold,
        },
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
        analyser: Analyser | None = None,
        auto_enroll: bool = False,
        series: SeriesPolicy | None = None,
        max_chunk_values: int = 64_000_000,
        observer: WorkerObserver | None = None,
        priors: PriorsFetcher | None = None,
    ) -> None:
        self.sessions = sessions
        self.observer: WorkerObserver = observer or NoObserver()
        self.config = config
        self.name = name
        self.spool_root = spool_root
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.analyser = analyser
        self.auto_enroll = auto_enroll
        self.series = series
        # 64 M float32 values: about 256 MB of pixels in flight, over 100 CT images of
        # 512 x 512 or 8 radiographs of 2000 x 2000 at a time
        self.max_chunk_values = max_chunk_values
        self.priors = priors
        self.processed = 0
        self.series_decided = 0
        self.judged_again = 0

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

    def check_priors(
        self, jobs: list[ClaimedJob], results: list[PipelineResult]
    ) -> dict[int, PriorsCheck]:
        """Each decoded image's header patient's PACS priors, fetched where they are missing
        (before the models judge the batch, so they judge against them)."""
        fetcher = self.priors
        if fetcher is None or self.analyser is None:
            return {}
        wanted: dict[int, PriorsWanted] = {}
        for job, result in zip(jobs, results, strict=True):
            modality = fetcher.tag_map.get((job.modality or "").strip().upper())
            if result.enhanced is not None and job.patient_id and modality:
                wanted[job.job_id] = PriorsWanted(job.patient_id, modality, job.study_instance_uid)
        if not wanted:
            return {}
        started = time.perf_counter()
        try:
            # the serving models as the last batch left them (analyse refreshes them after)
            checks = fetcher.check(list(wanted.values()))
        except SQLAlchemyError:
            raise
        except Exception as exc:  # the PACS's trouble is never the worker's end
            log.exception("priors failed for a batch of %d images", len(wanted))
            reason = f"priors unavailable: {type(exc).__name__}: {exc}"
            checks = {w: PriorsCheck(False, reason=reason, wait=True) for w in wanted.values()}
        per_image = round((time.perf_counter() - started) * 1000.0 / len(wanted), 3)
        for job, result in zip(jobs, results, strict=True):
            if job.job_id in wanted:
                result.timings_ms["priors"] = per_image
        return {job_id: checks[want] for job_id, want in wanted.items()}

    def process(
        self,
        job: ClaimedJob,
        result: PipelineResult | None = None,
        analysis: Analysis | None = None,
        priors: PriorsCheck | None = None,
    ) -> bool:
        if result is None:
            result = run_pipeline(self.spool_root / job.spool_path, self.config)
        with self.sessions.begin() as session:
            return self._store(session, job, result, analysis, priors)

    def _store(
        self,
        session: Session,
        job: ClaimedJob,
        result: PipelineResult,
        analysis: Analysis | None,
        priors: PriorsCheck | None = None,
    ) -> bool:
        outcome = job_outcome(result, self.config, analysis, priors)
        stored = finish_job(
            session,
            job=job,
            worker=self.name,
            outcome=outcome,
            embedding=_embedding(with_priors(analysis, priors)),
        )
        if stored:
            if log.isEnabledFor(logging.DEBUG):  # no context dict per job unless it is logged
                log.debug(
                    "job %s: %s",
                    job.job_id,
                    "done" if result.ok else "failed",
                    extra=self._context(job),
                )
            for record in audit_records(job, outcome, self.name):
                append_audit(session, record=record)
            if self.auto_enroll and analysis is not None:
                self._enroll_new_patient(session, job, analysis)
        else:
            log.warning(
                "job %s: lease lost to another worker; result discarded",
                job.job_id,
                extra=self._context(job),
            )
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
        """Claim and process one batch; the number of jobs claimed.

        The batch goes to the models in chunks of at most ``max_chunk_values`` decoded and
        enhanced values, so a batch of large radiographs does not hold them all in memory."""
        jobs = self.claim()
        chunk: list[tuple[ClaimedJob, PipelineResult]] = []
        values = 0
        for job in jobs:
            result = run_pipeline(self.spool_root / job.spool_path, self.config)
            chunk.append((job, result))
            values += result.enhanced.size if result.enhanced is not None else 0
            values += result.decoded.frames.size if result.decoded is not None else 0
            if values >= self.max_chunk_values:
                self._finish(chunk)
                chunk, values = [], 0
        if chunk:
            self._finish(chunk)
        return len(jobs)

    def _finish(self, work: list[tuple[ClaimedJob, PipelineResult]]) -> None:
        """The models over the chunk at once, then its results in one transaction."""
        priors = self.check_priors([j for j, _ in work], [r for _, r in work])
        analyses = self.analyse([j for j, _ in work], [r for _, r in work])
        try:
            # One transaction (one fsync) for the whole chunk's results...
            with self.sessions.begin() as session:
                kept = [
                    (j, r)
                    for j, r in work
                    if self._store(session, j, r, analyses.get(j.job_id), priors.get(j.job_id))
                ]
            stored = len(kept)
            for job, result in kept:
                self._observe(result, analyses.get(job.job_id))
        except OperationalError:
            raise  # the database is away: the worker retries the claim when it returns
        except SQLAlchemyError:
            # ...unless one of them cannot be stored: then each on its own, so one bad row
            # does not hold back the others.
            log.exception(
                "storing a batch of %d results failed; storing them one by one", len(work)
            )
            stored = 0
            for job, result in work:
                try:
                    if self.process(job, result, analyses.get(job.job_id), priors.get(job.job_id)):
                        stored += 1
                        self._observe(result, analyses.get(job.job_id))
                except SQLAlchemyError:
                    log.exception(
                        "job %s: the result could not be stored",
                        job.job_id,
                        extra=self._context(job),
                    )
        self.processed += stored

    def _context(self, job: ClaimedJob) -> dict[str, object]:
        """A log record's context (medreid.logs): never the patient."""
        return {"job_id": job.job_id, "sop_instance_uid": job.sop_instance_uid, "worker": self.name}

    def _observe(self, result: PipelineResult, analysis: Analysis | None) -> None:
        identity = analysis.identity if analysis is not None else None
        self.observer.job_finished(
            timings_ms=result.timings_ms,
            ok=result.ok,
            modality=(analysis.routed_to or analysis.predicted_modality) if analysis else None,
            identity_verdict=str(identity.verdict) if identity else None,
        )

    def close_quiet_series(self) -> int:
        """Judge every series that has been quiet long enough; the number of verdicts stored."""
        policy = self.series
        if policy is None or not policy.modalities:
            return 0
        quiet_before = utcnow() - dt.timedelta(seconds=policy.quiet_s)
        with self.sessions.begin() as session:
            candidates = quiet_series(
                session, modalities=policy.modalities, quiet_before=quiet_before
            )
        stored = 0
        for candidate in candidates:
            try:
                stored += self._judge_series(candidate, policy)
            except IntegrityError:
                # another worker judged it first: its verdict stands
                log.debug("series %s judged by another worker", candidate.series_instance_uid)
        self.series_decided += stored
        return stored

    def _judge_series(self, candidate: QuietSeries, policy: SeriesPolicy) -> int:
        with self.sessions.begin() as session:
            rows = series_results(session, series_uid=candidate.series_instance_uid)
            if not rows or any(result is None for _, result in rows):
                return 0
            header = SeriesHeader.of([instance for instance, _ in rows])
            findings = [
                ImageFinding(
                    predicted_modality=result.predicted_modality,
                    identity_verdict=result.identity_verdict,
                    header_score=result.identity_header_score,
                    top_matches=result.top_matches,
                    threshold=result.identity_threshold,
                    margin=result.identity_margin,
                )
                for _, result in rows
                if result is not None
            ]
            verdict = aggregate_series(
                findings,
                header_patient=header.patient_id,
                header_modality=header.modality,
                tag_map=policy.tag_map or {},
                margin=policy.mismatch_margin,
            )
            saved = save_series_verdict(
                session, row=series_row(header, verdict, candidate.last_received_at, self.name)
            )
            if saved is None:
                return 0
            for record in series_audit_records(saved, self.name):
                append_audit(session, record=record)
            return 1

    def retry_priors(self) -> int:
        """Images that wait for priors: ask the PACS again where it is time, and judge them
        again once their priors are had (or given up). The number judged again."""
        fetcher = self.priors
        if fetcher is None or self.analyser is None:
            return 0
        with self.sessions.begin() as session:
            pairs = waiting_pairs(session)
        if not pairs:
            return 0
        self.analyser.refresh()
        judged = 0
        for patient_id, modality in pairs:
            key = fetcher.key(patient_id, modality)
            with self.sessions.begin() as session:
                waiting = awaiting_results(session, patient_id=patient_id, modality=modality)
                if key is None:  # no model serves the modality any more: nothing to judge with
                    for wait in waiting:
                        stop_waiting(
                            session, result_id=wait.result_id, reason=f"no {modality} model serves"
                        )
                    continue
                held = priors_held(session, key=key)
            if held.state == PriorFetchState.UNAVAILABLE and (
                held.next_attempt_at is not None and held.next_attempt_at > utcnow()
            ):
                continue
            if held.state not in (PriorFetchState.FETCHED, PriorFetchState.GAVE_UP):
                # never asked under this model, due again, or being fetched (None: by another
                # worker whose lease holds; a dead worker's lease runs out)
                outcome = fetcher.fetch(
                    key,
                    exclude_studies={w.study_instance_uid for w in waiting if w.study_instance_uid},
                    deadline=time.monotonic() + fetcher.settings.budget_s,
                )
                if outcome is None or (
                    outcome.error is not None and outcome.state != PriorFetchState.GAVE_UP
                ):
                    continue
            judged += self.judge_awaiting(waiting)
        self.judged_again += judged
        return judged

    def judge_awaiting(self, waiting: list[AwaitingResult]) -> int:
        """Judge again images that waited for priors, from their spooled files, a batch at a
        time (a long series is not decoded at once); each once."""
        judged = 0
        for start in range(0, len(waiting), self.batch_size):
            judged += self._judge_awaiting(waiting[start : start + self.batch_size])
        return judged

    def _judge_awaiting(self, waiting: list[AwaitingResult]) -> int:
        jobs = [
            ClaimedJob(
                w.job_id,
                w.instance_id,
                0,
                w.spool_path,
                w.sop_instance_uid,
                w.patient_id,
                w.study_instance_uid,
                w.modality,
            )
            for w in waiting
        ]
        results = [run_pipeline(self.spool_root / j.spool_path, self.config) for j in jobs]
        checks = self.check_priors(jobs, results)
        analyses = self.analyse(jobs, results)
        judged = 0
        with self.sessions.begin() as session:
            for job, result, wait in zip(jobs, results, waiting, strict=True):
                analysis, check = analyses.get(job.job_id), checks.get(job.job_id)
                if not result.ok:
                    # its spooled file cannot be read again: it keeps its verdict, with why
                    judged += stop_waiting(
                        session,
                        result_id=wait.result_id,
                        reason=f"not judged again: {result.failed_stage}: {result.failure_reason}",
                    )
                    continue
                if analysis is None or check is None or (not check.available and check.wait):
                    continue  # still not to be had: it keeps waiting
                outcome = job_outcome(result, self.config, analysis, check)
                if judge_again(
                    session,
                    result_id=wait.result_id,
                    job=job,
                    outcome=outcome,
                    worker=self.name,
                    embedding=_embedding(with_priors(analysis, check)),
                ):
                    judged += 1
                    for record in audit_records(job, outcome, self.name):
                        if record.kind == audit.PATIENT_MISMATCH:
                            append_audit(session, record=record)
        return judged

    def run(self, should_stop: Callable[[], bool]) -> None:
        log.info("worker %s started", self.name)
        next_series_check = 0.0
        next_priors_check = 0.0
        while not should_stop():
            try:
                claimed = self.run_once()
            except SQLAlchemyError as exc:
                log.error("worker %s: database error, retrying: %s", self.name, exc)
                self.observer.database_error()
                claimed = 0
                time.sleep(min(5.0, self.poll_interval_s * 4))
            if self.series is not None and time.monotonic() >= next_series_check:
                # also under load, so a busy queue does not hold series verdicts back
                next_series_check = time.monotonic() + min(5.0, max(0.5, self.series.quiet_s / 4))
                try:
                    self.close_quiet_series()
                except SQLAlchemyError as exc:
                    log.error("worker %s: series verdicts: database error: %s", self.name, exc)
                    self.observer.database_error()
            if self.priors is not None and time.monotonic() >= next_priors_check:
                next_priors_check = time.monotonic() + min(5.0, self.priors.settings.retry_s)
                try:
                    self.retry_priors()
                except SQLAlchemyError as exc:
                    log.error("worker %s: priors: database error: %s", self.name, exc)
                    self.observer.database_error()
                except Exception:  # never the worker's end
                    log.exception("worker %s: judging images that wait for priors", self.name)
            if claimed == 0:
                time.sleep(self.poll_interval_s)
        log.info("worker %s stopped after %d jobs", self.name, self.processed)
