"""Metrics (Prometheus text format) and health for a hospital's monitoring.

`medreid serve` runs the SCP in its main process and the pipeline in worker processes; each
writes its counters and histograms to files under one folder (prometheus-client's
multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` before the library is first
imported), and the main process's listener adds them up at each scrape, beside gauges read
from the database and the spool at that moment. No label carries patient data: statuses,
calling AE titles (at most :data:`MAX_AE_LABELS` of them), stages, modalities, verdicts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import IntEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from medreid.reconcile import READINESS_PROBE_PREFIX
from scp.status import StoreStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_AE_LABELS = 64  # further calling AE titles are counted as "(other)"
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECK_TIMEOUT_S = 5.0


def start_multiprocess_metrics() -> Path:
    """A fresh folder for this service's metric files, named in the environment that the
    worker processes inherit. Call before anything imports prometheus_client."""
    folder = Path(tempfile.mkdtemp(prefix="medreid-metrics-"))
    os.environ[MULTIPROCESS_ENV] = str(folder)
    return folder


def end_multiprocess_metrics(folder: Path) -> None:
    os.environ.pop(MULTIPROCESS_ENV, None)
    shutil.rmtree(folder, ignore_errors=True)


class ServiceMetrics:
    """The metrics that the SCP and the workers count as they go."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # registry None: multiprocess mode, where values live in files, not in a registry
        from prometheus_client import Counter, Histogram

        self.cstores = Counter(
            "medreid_cstore",
            "C-STORE requests answered, by DIMSE status and calling AE title",
            ["status", "calling_ae"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "medreid_received_bytes",
            "Bytes of datasets received by C-STORE, whatever the answer",
            registry=registry,
        )
        self.associations = Counter(
            "medreid_associations",
            "Associations accepted and rejected; reason is the rejection's",
            ["outcome", "reason"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "medreid_stage_duration_seconds",
            "Duration of each pipeline stage per image (read, decode, clahe, models)",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=registry,
        )
        self.results = Counter(
            "medreid_results",
            "Results stored, by routed modality, identity verdict and pipeline status",
            ["modality", "identity_verdict", "status"],
            registry=registry,
        )
        self.database_errors = Counter(
            "medreid_database_errors",
            "Database operations that failed (the database unreachable or refusing)",
            ["component"],
            registry=registry,
        )
        self.quarantined = Counter(
            "medreid_spool_quarantined_files",
            "Spool files moved to quarantine at start-up (.part files, files with no row)",
            registry=registry,
        )
        for component in ("scp", "worker", "monitoring"):
            self.database_errors.labels(component=component)  # exported as 0 from the start
        self._ae_labels: set[str] = set()
        self._lock = threading.Lock()

    def ae_label(self, calling_ae: str) -> str:
        with self._lock:
            if calling_ae in self._ae_labels:
                return calling_ae
            if len(self._ae_labels) < MAX_AE_LABELS:
                self._ae_labels.add(calling_ae)
                return calling_ae
        return "(other)"


def status_label(status: int) -> str:
    return f"0x{status:04X}"


class ScpMetrics:
    """scp.ports.ScpObserver over ServiceMetrics."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def association_accepted(self, calling_ae: str) -> None:
        self.metrics.associations.labels(outcome="accepted", reason="").inc()

    def association_rejected(self, calling_ae: str, reason: str) -> None:
        self.metrics.associations.labels(outcome="rejected", reason=reason[:64]).inc()

    def store_answered(self, calling_ae: str, status: int, size_bytes: int) -> None:
        ae = self.metrics.ae_label(calling_ae)
        self.metrics.cstores.labels(status=status_label(status), calling_ae=ae).inc()
        self.metrics.received_bytes.inc(size_bytes)
        if status == StoreStatus.OUT_OF_RESOURCES_DATABASE:
            self.metrics.database_errors.labels(component="scp").inc()


class WorkerMetrics:
    """pipeline.ports.WorkerObserver over ServiceMetrics."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def job_finished(
        self,
        *,
        timings_ms: Mapping[str, float],
        ok: bool,
        modality: str | None,
        identity_verdict: str | None,
    ) -> None:
        for stage, ms in timings_ms.items():
            if stage in {"read", "decode", "clahe", "models"}:
                self.metrics.stage_seconds.labels(stage=stage).observe(ms / 1000.0)
        self.metrics.results.labels(
            modality=modality or "none",
            identity_verdict=identity_verdict or "none",
            status="ok" if ok else "failed",
        ).inc()

    def database_error(self) -> None:
        self.metrics.database_errors.labels(component="worker").inc()


# ---------------------------------------------------------------------------- readiness


class WorkerState(IntEnum):
    """What a worker process reports of itself (a shared array, one slot a worker)."""

    STARTING = 0  # loading its models
    READY = 1
    MODELS_FAILED = 2  # analysis is on and models are installed, but they did not load
    WITHOUT_MODELS = 3  # ready, decoding and enhancing only: analysis off or no models installed


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    alive: bool
    state: WorkerState


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class Readiness:
    """The database reachable, the spool writable and above its watermark, the models loaded
    and the workers alive; each check named, with what is wrong."""

    def __init__(
        self,
        *,
        engine: Engine,
        spool_root: Path,
        min_free_bytes: int,
        workers: Callable[[], list[WorkerStatus]],
    ) -> None:
        self.engine = engine
        self.spool_root = spool_root
        self.min_free_bytes = min_free_bytes
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medreid-readyz")

    def database(self) -> Check:
        try:
            future = self._executor.submit(self._ping)
            future.result(timeout=CHECK_TIMEOUT_S)
        except FutureTimeout:
            return Check("database", False, f"no answer within {CHECK_TIMEOUT_S:g} s")
        except Exception as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
            return Check("database", False, f"unreachable: {type(exc).__name__}: {reason}")
        return Check("database", True, "reachable")

    def _ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def spool(self) -> Check:
        try:
            self.spool_root.mkdir(parents=True, exist_ok=True)
            # On Linux the probe has no name (O_TMPFILE), so a kill mid-probe leaves nothing;
            # elsewhere a named one left behind is cleared by reconcile_spool at the next start.
            with tempfile.TemporaryFile(dir=self.spool_root, prefix=READINESS_PROBE_PREFIX) as f:
                f.write(b"\0")
                f.flush()
            free = shutil.disk_usage(self.spool_root).free
        except OSError as exc:
            return Check("spool", False, f"not writable: {exc.strerror or exc}")
        if free < self.min_free_bytes:
            return Check(
                "spool",
                False,
                f"{free // 2**20} MB free, below its watermark of "
                f"{self.min_free_bytes // 2**20} MB (spool.min_free_mb)",
            )
        return Check("spool", True, f"writable, {free // 2**20} MB free")

    def models_and_workers(self) -> list[Check]:
        workers = self.workers()
        if not workers:  # workers.processes = 0: `medreid worker` processes run elsewhere
            return [
                Check("models", True, "none here: no worker processes (workers.processes = 0)"),
                Check("workers", True, "none here (workers.processes = 0)"),
            ]
        dead = [w.name for w in workers if not w.alive]
        failed = [w.name for w in workers if w.alive and w.state == WorkerState.MODELS_FAILED]
        starting = [w.name for w in workers if w.alive and w.state == WorkerState.STARTING]
        if failed:
            models = Check("models", False, f"could not be loaded by {', '.join(failed)}")
        elif starting:
            models = Check("models", False, f"still loading in {', '.join(starting)}")
        elif all(w.state == WorkerState.WITHOUT_MODELS for w in workers):
            models = Check("models", True, "none: analysis is off or no models are installed")
        else:
            models = Check("models", True, f"loaded in {len(workers)} worker(s)")
        if dead:
            workers_check = Check("workers", False, f"not running: {', '.join(dead)}")
        else:
            workers_check = Check("workers", True, f"{len(workers)} running")
        return [models, workers_check]

    def check(self) -> list[Check]:
        return [self.database(), self.spool(), *self.models_and_workers()]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def readiness_body(checks: list[Check]) -> dict[str, Any]:
    return {
        "ready": all(c.ok for c in checks),
        "not_ready": [c.name for c in checks if not c.ok],
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }


# ---------------------------------------------------------------------------- scrape


class ServiceGauges:
    """Gauges read when scraped: the queue, open alerts, spool free bytes, readiness."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        readiness: Readiness,
        metrics: ServiceMetrics,
        clock: Callable[[], Any],
    ) -> None:
        self.sessions = sessions
        self.readiness = readiness
        self.metrics = metrics
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        from storage.reports import open_alerts, queue_state

        checks = self.readiness.check()
        ready = GaugeMetricFamily(
            "medreid_ready", "1 when every readiness check passes", labels=["check"]
        )
        for check in checks:
            ready.add_metric([check.name], 1.0 if check.ok else 0.0)
        yield ready
        try:
            free = shutil.disk_usage(self.readiness.spool_root).free
            yield GaugeMetricFamily(
                "medreid_spool_free_bytes", "Free bytes on the spool's filesystem", value=free
            )
        except OSError:
            pass
        now = self.clock()
        try:
            with self.sessions.begin() as session:
                queue = queue_state(session)
                images, series = open_alerts(session)
        except Exception as exc:
            log.warning("metrics: the database could not be read: %s", type(exc).__name__)
            self.metrics.database_errors.labels(component="monitoring").inc()
            return
        jobs = GaugeMetricFamily("medreid_queue_jobs", "Jobs queued, by state", labels=["state"])
        jobs.add_metric(["pending"], queue.pending)
        jobs.add_metric(["running"], queue.running)
        yield jobs
        oldest = 0.0
        if queue.oldest_pending_at is not None:
            oldest = max(0.0, (now - queue.oldest_pending_at).total_seconds())
        yield GaugeMetricFamily(
            "medreid_queue_oldest_pending_age_seconds",
            "Age of the oldest pending job (0 when none is pending)",
            value=oldest,
        )
        alerts = GaugeMetricFamily(
            "medreid_open_alerts",
            "Alerts no reviewer has decided yet, of images and of series",
            labels=["kind"],
        )
        alerts.add_metric(["image"], images)
        alerts.add_metric(["series"], series)
        yield alerts

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only


def scrape_registry(folder: Path, gauges: ServiceGauges) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    registry.register(gauges)
    return registry


# ---------------------------------------------------------------------------- listener


class MonitoringServer:
    """/metrics, /healthz and /readyz over plain HTTP on metrics.bind_address:metrics.port."""

    def __init__(
        self, *, host: str, port: int, registry: CollectorRegistry, readiness: Readiness
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.started = time.monotonic()
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    uptime = round(time.monotonic() - server.started, 1)
                    self._json(200, {"alive": True, "uptime_s": uptime})
                elif path == "/readyz":
                    body = readiness_body(server.readiness.check())
                    self._json(200 if body["ready"] else 503, body)
                else:
                    self._json(404, {"error": "not found: /metrics, /healthz or /readyz"})

            def _json(self, code: int, body: dict[str, Any]) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code: int, payload: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("monitoring: " + format, *args)

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="medreid-monitoring", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
