"""The composition root: builds the engine, sessionmaker, spool, SCP and workers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from medreid import __version__
from medreid.monitoring import (
    MonitoringServer,
    Readiness,
    ScpMetrics,
    ServiceGauges,
    ServiceMetrics,
    end_multiprocess_metrics,
    readiness_body,
    scrape_registry,
    start_multiprocess_metrics,
)
from medreid.reconcile import Reconciliation, reconcile_spool
from medreid.settings import Settings
from scp.contexts import IMAGE_STORAGE_CLASSES
from scp.ports import ScpObserver
from scp.server import DicomServer
from scp.spool import Spool
from scp.store import StoreService
from storage import audit
from storage.audit_trail import append_audit
from storage.db import require_current_schema
from storage.jobs import release_jobs_of
from storage.models import Association, AssociationOutcome, utcnow
from storage.outbox import release_deliveries_of

if TYPE_CHECKING:
    from console.server import ConsoleServer
    from medreid.outbox import OutboxDispatcher

from medreid.builders import build_database, os_user, pipeline_config
from medreid.processes import WorkerPool

log = logging.getLogger(__name__)


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


def build_service(settings: Settings, observer: ScpObserver | None = None) -> Service:
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
    server = DicomServer(settings=settings.scp, store=store, sessions=sessions, observer=observer)
    return Service(settings, engine, sessions, server, node_name(settings))


def recover_after_restart(service: Service) -> tuple[int, int]:
    """Hand back the jobs and the outgoing messages our previous run held and close its
    dangling associations."""
    with service.sessions.begin() as session:
        released = release_jobs_of(session, claimant_prefix=f"{service.node}/")
        released += release_deliveries_of(session, claimant_prefix=f"{service.node}/")
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


class NotReadyError(RuntimeError):
    """`medreid serve` could not become ready; the message names what is not."""


def build_outbox(
    settings: Settings, sessions: sessionmaker[Session], node: str
) -> OutboxDispatcher | None:
    """The outbox's dispatcher over the configured channels (None where there is none)."""
    from medreid.alert_reports import RejectionChannel, ReportChannel
    from medreid.outbox import Channel, OutboxDispatcher
    from medreid.webhooks import WebhookChannel

    channels: list[Channel] = []
    if settings.outbox.report_destinations:
        spool = settings.spool.dir.resolve()
        channels.append(ReportChannel(settings.outbox, spool, node, __version__))
        if settings.outbox.send_rejection_notes:
            channels.append(RejectionChannel(settings.outbox, spool, node))
    if settings.webhooks.urls:
        channels.append(WebhookChannel(settings.webhooks))
    if not channels:
        return None
    return OutboxDispatcher(sessions, settings.outbox, channels, f"{node}/outbox")


def serve(settings: Settings, config_path: str | None) -> int:
    """Run the SCP, its workers, the console and the monitoring listener until SIGTERM or
    SIGINT. Raises NotReadyError when not ready within metrics.startup_timeout_s."""
    started = time.monotonic()
    # before prometheus_client is first imported, here and in the workers that inherit it
    metrics_dir = start_multiprocess_metrics()
    try:
        return _serve(settings, config_path, metrics_dir, started)
    finally:
        end_multiprocess_metrics(metrics_dir)


def _serve(settings: Settings, config_path: str | None, metrics_dir: Path, started: float) -> int:
    metrics = ServiceMetrics()
    service = build_service(settings, observer=ScpMetrics(metrics))
    released, closed = recover_after_restart(service)
    if released or closed:
        log.info(
            "recovered after restart: %d unfinished jobs and messages queued again, %d "
            "associations closed",
            released,
            closed,
        )
    settle_s = settings.spool.reconcile_settle_s
    reconciled = _reconcile(settings, service.sessions, metrics, settle_s=settle_s)
    deferred_check: threading.Timer | None = None
    if reconciled.deferred:
        log.info(
            "spool: %d file(s) written in the last %g s (spool.reconcile_settle_s) may be "
            "another service's, not yet recorded; judged again in %g s",
            len(reconciled.deferred),
            settle_s,
            settle_s,
        )
        deferred_check = threading.Timer(
            settle_s,
            _reconcile,
            (settings, service.sessions, metrics),
            {"only": reconciled.deferred},
        )
        deferred_check.name = "medreid-spool-reconcile"
        deferred_check.daemon = True
        deferred_check.start()
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
                "spool_files_kept": reconciled.kept,
                "spool_files_quarantined": len(reconciled.quarantined),
                "console": settings.console.port if settings.console.enabled else None,
                "metrics": settings.metrics.port if settings.metrics.enabled else None,
            },
        ),
    )
    stop_requested = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop_requested.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)

    pool = WorkerPool(settings, config_path, service.node)
    readiness = Readiness(
        engine=service.engine,
        spool_root=settings.spool.dir.resolve(),
        min_free_bytes=settings.spool.min_free_mb * 1024 * 1024,
        workers=pool.statuses,
    )
    monitoring: MonitoringServer | None = None
    console: ConsoleServer | None = None
    outbox: OutboxDispatcher | None = None
    pool.start()
    try:
        if settings.metrics.enabled:
            gauges = ServiceGauges(
                sessions=service.sessions, readiness=readiness, metrics=metrics, clock=utcnow
            )
            try:
                monitoring = MonitoringServer(
                    host=settings.metrics.bind_address,
                    port=settings.metrics.port,
                    registry=scrape_registry(metrics_dir, gauges),
                    readiness=readiness,
                )
            except OSError as exc:
                raise NotReadyError(
                    f"metrics listener: cannot listen on {settings.metrics.bind_address}:"
                    f"{settings.metrics.port}: {exc.strerror or exc} (metrics.port)"
                ) from None
            monitoring.start()
        console = build_console(settings, service.sessions) if settings.console.enabled else None
        if console is not None:
            console.start()
        # the DICOM port opens last: once it accepts, /healthz, /metrics and the console answer
        service.server.start()
        outbox = build_outbox(settings, service.sessions, service.node)
        if outbox is not None:
            outbox.start()
        _wait_until_ready(readiness, settings.metrics.startup_timeout_s, stop_requested)
        log.info(
            "medreid %s ready in %.1f s: AE %s, port %d, %d worker process(es), database %s%s%s",
            __version__,
            time.monotonic() - started,
            settings.scp.ae_title,
            service.server.port,
            settings.workers.processes,
            service.engine.url.render_as_string(hide_password=True),
            f", console {console.url}" if console is not None else "",
            f", metrics {monitoring.url}/metrics" if monitoring is not None else "",
        )
        while not stop_requested.wait(1.0):
            pool.restart_dead(service.sessions)
    finally:
        if deferred_check is not None:
            deferred_check.cancel()
        service.server.stop()
        if console is not None:
            console.stop()
        if outbox is not None:
            outbox.stop()
        pool.stop()
        if monitoring is not None:
            monitoring.stop()
        readiness.close()
        try:
            record_audit(
                service.sessions,
                audit.AuditRecord(
                    kind=audit.APPLICATION_STOP,
                    actor_user=os_user(),
                    actor_ae=settings.scp.ae_title,
                    detail={"pid": os.getpid()},
                ),
            )
        except Exception:
            log.exception("the stop could not be audited")
        service.engine.dispose()
    return 0


def _reconcile(
    settings: Settings,
    sessions: sessionmaker[Session],
    metrics: ServiceMetrics,
    *,
    settle_s: float = 0.0,
    only: list[Path] | None = None,
) -> Reconciliation:
    """Reconcile the spool (``only``: just these files), count and log what was quarantined."""
    try:
        reconciled = reconcile_spool(
            settings.spool.dir,
            sessions,
            clock=utcnow,
            actor_user=os_user(),
            actor_ae=settings.scp.ae_title,
            settle_s=settle_s,
            only=only,
        )
    except Exception:
        if only is None:
            raise  # at start: the service does not start on a spool it cannot reconcile
        log.exception("spool: the deferred reconciliation failed; the next start does it")
        return Reconciliation(kept=0, quarantined=[], deferred=[])
    if reconciled.quarantined:
        metrics.quarantined.inc(len(reconciled.quarantined))
        log.warning(
            "spool: %d file(s) no row records moved to %s (never acknowledged; audited): %s",
            len(reconciled.quarantined),
            settings.spool.dir / "quarantine",
            ", ".join(q.relative_path for q in reconciled.quarantined[:5])
            + (" ..." if len(reconciled.quarantined) > 5 else ""),
        )
    return reconciled


def _wait_until_ready(readiness: Readiness, timeout_s: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        body = readiness_body(readiness.check())
        if body["ready"] or stop.is_set():
            return
        if time.monotonic() >= deadline:
            reasons = "; ".join(
                f"{name}: {body['checks'][name]['detail']}" for name in body["not_ready"]
            )
            raise NotReadyError(
                f"not ready {timeout_s:g} s after start (metrics.startup_timeout_s): {reasons}"
            )
        stop.wait(0.5)
