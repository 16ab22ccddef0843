"""The composition root: builds the engine, sessionmaker, spool, SCP and workers."""

from __future__ import annotations

import ctypes
import getpass
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from medreid import __version__
from medreid.settings import Settings, load_settings
from pipeline.analysis import AnalysisSettings
from pipeline.clahe import ClaheParams
from pipeline.decode import DecodeParams
from pipeline.modelstore import Analyser, discover
from pipeline.runner import PipelineConfig
from pipeline.worker import SeriesPolicy, Worker
from scp.contexts import IMAGE_STORAGE_CLASSES
from scp.server import DicomServer
from scp.spool import Spool
from scp.store import StoreService
from storage import audit
from storage.db import make_engine, make_sessionmaker, require_current_schema
from storage.models import Association, AssociationOutcome, utcnow
from storage.repository import append_audit, release_jobs_of

if TYPE_CHECKING:
    from console.server import ConsoleServer

log = logging.getLogger(__name__)


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


def pipeline_config(settings: Settings) -> PipelineConfig:
    tile = settings.clahe.tile_grid
    return PipelineConfig(
        decode=DecodeParams(
            frames=settings.decode.frames,
            max_frames=settings.decode.max_frames,
            max_bytes=settings.scp.max_dataset_mb * 1024 * 1024,
        ),
        clahe=ClaheParams(clip_limit=settings.clahe.clip_limit, tile_grid=(tile[0], tile[1])),
    )


def build_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(settings.database.url, busy_timeout_s=settings.database.busy_timeout_s)
    return engine, make_sessionmaker(engine)


def node_name(settings: Settings) -> str:
    """Identifies this service's workers in job claims: host and DICOM port."""
    return f"{socket.gethostname()}:{settings.scp.port}"


def record_audit(sessions: sessionmaker[Session], record: audit.AuditRecord) -> None:
    with sessions.begin() as session:
        append_audit(session, record=record)


@dataclass
class Service:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    server: DicomServer
    node: str


def build_service(settings: Settings) -> Service:
    engine, sessions = build_database(settings)
    require_current_schema(engine)
    spool = Spool(
        settings.spool.dir,
        fsync=settings.spool.fsync,
        group_readable=settings.spool.group_readable,
    )
    store = StoreService(
        spool=spool,
        sessions=sessions,
        min_free_bytes=settings.spool.min_free_mb * 1024 * 1024,
        supported_sop_classes=frozenset(IMAGE_STORAGE_CLASSES.values()),
        max_dataset_bytes=settings.scp.max_dataset_mb * 1024 * 1024,
    )
    server = DicomServer(settings=settings.scp, store=store, sessions=sessions)
    return Service(settings, engine, sessions, server, node_name(settings))


def recover_after_restart(service: Service) -> tuple[int, int]:
    """Hand back the jobs our previous run held and close its dangling associations."""
    with service.sessions.begin() as session:
        released = release_jobs_of(session, claimant_prefix=f"{service.node}/")
        closed = session.execute(
            update(Association)
            .where(Association.outcome == AssociationOutcome.OPEN)
            .where(Association.called_ae == service.settings.scp.ae_title)
            .values(
                outcome=AssociationOutcome.ABORTED,
                ended_at=utcnow(),
                reason="the service stopped during the association",
            )
        )
    return released, int(closed.rowcount or 0)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- workers


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this process when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def worker_process_main(
    config_path: str | None, index: int, node: str, parent_pid: int, stop: EventType
) -> None:
    """Entry point of a worker process started by `medreid serve`."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = load_settings(Path(config_path) if config_path else None)
    logging.basicConfig(
        level=settings.logging.level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s",
    )
    run_worker(
        settings,
        name=f"{node}/{os.getpid()}/{index}",
        should_stop=lambda: stop.is_set() or os.getppid() != parent_pid,
    )


def build_analyser(settings: Settings, sessions: sessionmaker[Session]) -> Analyser | None:
    """The worker's models and galleries, when analysis is on and models are installed."""
    if not settings.analysis.enabled:
        return None
    if not discover(settings.models.dir):
        log.warning("no models under %s: images are decoded and enhanced only", settings.models.dir)
        return None
    return Analyser(
        sessions,
        settings.models.dir,
        AnalysisSettings(
            tag_map=settings.analysis.tag_mapping(),
            on_disagreement=settings.analysis.on_disagreement,
            top_k=settings.analysis.top_k,
            mismatch_margin=settings.analysis.mismatch_margin,
        ),
    )


def run_worker(settings: Settings, *, name: str, should_stop: Callable[[], bool]) -> None:
    engine, sessions = build_database(settings)
    analyser = build_analyser(settings, sessions)
    if analyser is not None:
        try:
            analyser.refresh()  # load the models once, before the first job
        except Exception:
            # Receiving and decoding go on; the log says why there are no verdicts.
            log.exception(
                "the models under %s could not be loaded: no verdicts until fixed",
                settings.models.dir,
            )
            analyser = None
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
    )
    try:
        worker.run(should_stop)
    finally:
        engine.dispose()


def start_workers(
    settings: Settings, config_path: str | None, node: str
) -> tuple[list[multiprocessing.process.BaseProcess], EventType]:
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    processes: list[multiprocessing.process.BaseProcess] = []
    for index in range(settings.workers.processes):
        process = context.Process(
            target=worker_process_main,
            args=(config_path, index, node, os.getpid(), stop),
            name=f"medreid-worker-{index}",
            daemon=True,
        )
        process.start()
        processes.append(process)
    return processes, stop


# ---------------------------------------------------------------------------- console


def build_console(settings: Settings, sessions: sessionmaker[Session]) -> ConsoleServer:
    """The administrators' web console over this service's database (console.enabled)."""
    import datetime as dt

    from console.app import ConsoleConfig, ConsoleContext, create_app
    from console.server import ConsoleServer

    cfg = settings.console
    context = ConsoleContext(
        sessions=sessions,
        spool_root=settings.spool.dir.resolve(),
        pipeline=pipeline_config(settings),
        config=ConsoleConfig(
            session_idle=dt.timedelta(minutes=cfg.session_idle_min),
            session_max=dt.timedelta(hours=cfg.session_max_h),
            page_rows=cfg.page_rows,
            export_max_rows=cfg.export_max_rows,
            lockout_failures=cfg.lockout_failures,
            lockout_failures_per_address=cfg.lockout_failures_per_address,
            lockout_window=dt.timedelta(minutes=cfg.lockout_window_min),
            https=cfg.tls_enabled,
        ),
        version=__version__,
    )
    return ConsoleServer(
        create_app(context),
        host=cfg.bind_address,
        port=cfg.port,
        certificate=cfg.tls_certificate,
        private_key=cfg.tls_private_key,
    )


# ---------------------------------------------------------------------------- serve


def serve(settings: Settings, config_path: str | None) -> int:
    """Run the SCP and its workers until SIGTERM or SIGINT."""
    started = time.monotonic()
    service = build_service(settings)
    released, closed = recover_after_restart(service)
    if released or closed:
        log.info(
            "recovered after restart: %d unfinished jobs queued again, %d associations closed",
            released,
            closed,
        )
    record_audit(
        service.sessions,
        audit.AuditRecord(
            kind=audit.APPLICATION_START,
            actor_user=os_user(),
            actor_ae=settings.scp.ae_title,
            detail={
                "version": __version__,
                "port": settings.scp.port,
                "pid": os.getpid(),
                "workers": settings.workers.processes,
                "jobs_requeued": released,
                "console": settings.console.port if settings.console.enabled else None,
            },
        ),
    )
    stop_requested = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop_requested.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)

    workers, stop_workers = start_workers(settings, config_path, service.node)
    service.server.start()
    console = build_console(settings, service.sessions) if settings.console.enabled else None
    try:
        if console is not None:
            console.start()
        log.info(
            "medreid %s ready in %.1f s: AE %s, port %d, %d worker process(es), database %s%s",
            __version__,
            time.monotonic() - started,
            settings.scp.ae_title,
            service.server.port,
            len(workers),
            service.engine.url.render_as_string(hide_password=True),
            f", console {console.url}" if console is not None else "",
        )
        while not stop_requested.wait(1.0):
            workers = _restart_dead(workers, service, config_path, stop_workers)
    finally:
        service.server.stop()
        if console is not None:
            console.stop()
        stop_workers.set()
        for process in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        record_audit(
            service.sessions,
            audit.AuditRecord(
                kind=audit.APPLICATION_STOP,
                actor_user=os_user(),
                actor_ae=settings.scp.ae_title,
                detail={"pid": os.getpid()},
            ),
        )
        service.engine.dispose()
    return 0


def _restart_dead(
    workers: list[multiprocessing.process.BaseProcess],
    service: Service,
    config_path: str | None,
    stop: EventType,
) -> list[multiprocessing.process.BaseProcess]:
    """Replace worker processes that died; their claimed jobs go back to the queue now
    rather than when their lease runs out (attempts still count, so a job that kills
    its worker every time is failed after workers.max_attempts)."""
    context = multiprocessing.get_context("spawn")
    alive = []
    for index, process in enumerate(workers):
        if process.is_alive():
            alive.append(process)
            continue
        log.error("worker %s exited with %s; restarting it", process.name, process.exitcode)
        try:
            with service.sessions.begin() as session:
                release_jobs_of(session, claimant_prefix=f"{service.node}/{process.pid}/")
        except Exception:
            log.exception("could not release the jobs of worker %s", process.name)
        replacement = context.Process(
            target=worker_process_main,
            args=(config_path, index, service.node, os.getpid(), stop),
            name=process.name,
            daemon=True,
        )
        replacement.start()
        alive.append(replacement)
    return alive
