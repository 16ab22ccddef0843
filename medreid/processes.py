"""The worker processes of `medreid serve`: started, watched, restarted, each loading its
models and reporting its state for /readyz."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from medreid.builders import build_database, build_priors, pipeline_config
from medreid.logs import configure_logging
from medreid.monitoring import (
    ServiceMetrics,
    WorkerMetrics,
    WorkerState,
    WorkerStatus,
)
from medreid.registry import SqlModelRegistry
from medreid.series import SeriesPolicy
from medreid.settings import Settings, load_settings
from medreid.worker import Worker
from pipeline.analysis import AnalysisSettings
from pipeline.modelstore import Analyser, discover
from storage.jobs import release_jobs_of

log = logging.getLogger(__name__)

MODELS_DATABASE_RETRY_S = 2.0


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this process when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def worker_process_main(
    config_path: str | None,
    index: int,
    node: str,
    parent_pid: int,
    stop: EventType,
    states: SynchronizedArray[int],
) -> None:
    """Entry point of a worker process started by `medreid serve`."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = load_settings(Path(config_path) if config_path else None)
    configure_logging(settings, process_name=f"worker-{index}")

    def report(state: WorkerState) -> None:
        states[index] = int(state)

    run_worker(
        settings,
        name=f"{node}/{os.getpid()}/{index}",
        should_stop=lambda: stop.is_set() or os.getppid() != parent_pid,
        report=report,
    )


def build_analyser(settings: Settings, sessions: sessionmaker[Session]) -> Analyser | None:
    """The worker's models and galleries, when analysis is on and models are installed."""
    if not settings.analysis.enabled:
        return None
    if not discover(settings.models.dir):
        log.warning("no models under %s: images are decoded and enhanced only", settings.models.dir)
        return None
    return Analyser(
        SqlModelRegistry(sessions),
        settings.models.dir,
        AnalysisSettings(
            tag_map=settings.analysis.tag_mapping(),
            on_disagreement=settings.analysis.on_disagreement,
            top_k=settings.analysis.top_k,
            mismatch_margin=settings.analysis.mismatch_margin,
        ),
        identity_modalities=frozenset(settings.analysis.identity_modalities),
    )


def _load_models(
    settings: Settings, sessions: sessionmaker[Session], should_stop: Callable[[], bool]
) -> tuple[Analyser | None, WorkerState]:
    """The worker's models, loaded once before the first job. A database that is away (the
    models to serve and the galleries are read from it) is waited for, not taken for broken
    models; models that cannot be loaded leave the worker decoding and enhancing only."""
    while True:
        try:
            analyser = build_analyser(settings, sessions)
            if analyser is None:
                return None, WorkerState.WITHOUT_MODELS
            analyser.refresh()
            return analyser, WorkerState.READY
        except SQLAlchemyError as exc:
            if should_stop():
                return None, WorkerState.STARTING
            log.warning(
                "the database is unavailable while loading the models (%s); trying again",
                type(exc).__name__,
            )
            time.sleep(MODELS_DATABASE_RETRY_S)
        except Exception:
            # Receiving and decoding go on, but the service is not ready (/readyz says why).
            log.exception(
                "the models under %s could not be loaded: no verdicts until fixed",
                settings.models.dir,
            )
            return None, WorkerState.MODELS_FAILED


def run_worker(
    settings: Settings,
    *,
    name: str,
    should_stop: Callable[[], bool],
    report: Callable[[WorkerState], None] | None = None,
) -> None:
    """Process jobs until ``should_stop``; ``report`` hears whether the models loaded."""
    engine, sessions = build_database(settings)
    analyser, state = _load_models(settings, sessions, should_stop)
    if report is not None:
        report(state)
    worker = Worker(
        sessions=sessions,
        config=pipeline_config(settings),
        name=name,
        spool_root=settings.spool.dir.resolve(),
        batch_size=settings.workers.batch_size,
        lease_s=settings.workers.lease_s,
        max_attempts=settings.workers.max_attempts,
        poll_interval_s=settings.workers.poll_interval_s,
        analyser=analyser,
        auto_enroll=settings.analysis.auto_enroll_new_patients,
        series=SeriesPolicy(
            modalities=settings.analysis.series_modalities,
            quiet_s=settings.analysis.series_quiet_s,
            tag_map=settings.analysis.tag_mapping(),
            mismatch_margin=settings.analysis.mismatch_margin,
        ),
        observer=WorkerMetrics(ServiceMetrics()),
        priors=build_priors(settings, sessions, analyser, name),
    )
    try:
        worker.run(should_stop)
    finally:
        engine.dispose()


class WorkerPool:
    """The worker processes of `medreid serve`, each reporting its state in a shared slot."""

    def __init__(self, settings: Settings, config_path: str | None, node: str) -> None:
        self.settings = settings
        self.config_path = config_path
        self.node = node
        self.context = multiprocessing.get_context("spawn")
        self.stop_event = self.context.Event()
        self.states = self.context.Array("b", settings.workers.processes)
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def _start(self, index: int) -> multiprocessing.process.BaseProcess:
        self.states[index] = int(WorkerState.STARTING)
        process = self.context.Process(
            target=worker_process_main,
            args=(self.config_path, index, self.node, os.getpid(), self.stop_event, self.states),
            name=f"medreid-worker-{index}",
            daemon=True,
        )
        process.start()
        return process

    def start(self) -> None:
        self.processes = [self._start(i) for i in range(self.settings.workers.processes)]

    def statuses(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(p.name or f"worker-{i}", p.is_alive(), WorkerState(self.states[i]))
            for i, p in enumerate(self.processes)
        ]

    def restart_dead(self, sessions: sessionmaker[Session]) -> None:
        """Replace worker processes that died; their claimed jobs go back to the queue now
        rather than when their lease runs out (attempts still count, so a job that kills
        its worker every time is failed after workers.max_attempts)."""
        for index, process in enumerate(self.processes):
            if process.is_alive():
                continue
            log.error("worker %s exited with %s; restarting it", process.name, process.exitcode)
            try:
                with sessions.begin() as session:
                    release_jobs_of(session, claimant_prefix=f"{self.node}/{process.pid}/")
            except Exception:
                log.exception("could not release the jobs of worker %s", process.name)
            self.processes[index] = self._start(index)

    def stop(self) -> None:
        self.stop_event.set()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
