"""`medreid serve` as a hospital's monitoring sees it, and as it survives crashes and a
database that goes away: /metrics after a storescu send, /readyz following the database, the
SIGKILL matrix of the store path with start-up reconciliation, JSON logs without patients."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from scp.pynetdicom_adapter import guard_requests
from scp.status import StoreStatus
from storage.models import AuditEvent, Instance, Job, Result
from support.dicom_factory import CT_IMAGE_STORAGE, encode, make_dataset
from support.service import (
    RunningService,
    free_port,
    send_with_storescu,
    service_env,
    wait_for_queue,
)
from tests.conftest import Database
from tests.test_faults import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.db]

REPO = Path(__file__).resolve().parents[1]
PATIENT = "OPS-PATIENT-0042"  # must never reach a log line or a metric


def datasets(n: int, seed: int = 3) -> list[Dataset]:
    rng = np.random.default_rng(seed)
    return [
        make_dataset(
            rng.integers(0, 4096, size=(64, 64), dtype=np.uint16),
            patient_id=PATIENT,
            RescaleSlope=1,
            RescaleIntercept=-1024,
            InstanceNumber=i + 1,
        )
        for i in range(n)
    ]


def dataset_bytes(part10: bytes) -> int:
    """The dataset's length without preamble and file meta, as a C-STORE carries it."""
    return len(part10) - (144 + int.from_bytes(part10[140:144], "little"))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    return status, json.loads(body)


def wait_readyz(port: int, ready: bool, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = readyz(port)
        except urllib.error.URLError:  # the listener starts just after the SCP's
            status, body = 0, {}
        if status and (status == 200) == ready:
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {status}: {body}"
        time.sleep(0.25)


def send(items: list[Dataset], port: int) -> dict[str, int | None]:
    """Each dataset on one association until it dies: its status, None where unanswered."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    statuses: dict[str, int | None] = {str(ds.SOPInstanceUID): None for ds in items}
    assoc = guard_requests(ae.associate("127.0.0.1", port, ae_title="MEDREID"))
    if not assoc.is_established:
        return statuses
    try:
        for ds in items:
            answer = assoc.send_c_store(ds)
            if "Status" not in answer:
                break
            statuses[str(ds.SOPInstanceUID)] = int(answer.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


# Without the models: these tests are about the service, not the analysis.
WITHOUT_MODELS = {"MEDREID_ANALYSIS_ENABLED": "false", "MEDREID_WORKERS_PROCESSES": "2"}


def json_log_lines(log: str) -> list[dict[str, Any]]:
    lines = [line for line in log.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


# ---------------------------------------------------------------------------- metrics


def test_metrics_count_what_storescu_sent(sqlite_database: Database, tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK (storescu) is not installed")
    metrics_port = free_port()
    service = RunningService.on(
        tmp_path,
        sqlite_database.url,
        MEDREID_METRICS_PORT=str(metrics_port),
        MEDREID_MODELS_DIR=str(REPO / "models"),
        MEDREID_WORKERS_PROCESSES="1",
        MEDREID_SCP_ALLOWED_PEERS="STORESCU",
        MEDREID_LOGGING_FORMAT="json",
        MEDREID_LOGGING_LEVEL="DEBUG",
    )
    port = service.port
    service.start()
    try:
        assert get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200
        wait_readyz(metrics_port, ready=True, timeout=120)
        files = []
        sent_uids = set()
        for i, ds in enumerate(datasets(5)):
            sent_uids.add(str(ds.SOPInstanceUID))
            path = tmp_path / f"ct{i}.dcm"
            path.write_bytes(encode(ds))
            files.append(path)
        assert all(send_with_storescu(path, port) for path in files)
        assert not send_with_storescu(files[0], port, calling="INTRUDER")  # rejected
        wait_for_queue(sqlite_database.sessions)
        samples = scrape(metrics_port)
        _, body = get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        service.stop()

    ok = (("calling_ae", "STORESCU"), ("status", "0x0000"))
    assert samples[("medreid_cstore_total", ok)] == 5
    assert total(samples, "medreid_cstore_total") == 5
    sent = sum(dataset_bytes(path.read_bytes()) for path in files)
    assert samples[("medreid_received_bytes_total", ())] == sent
    assert samples[("medreid_associations_total", (("outcome", "accepted"), ("reason", "")))] == 5
    rejected = (("outcome", "rejected"), ("reason", "calling AE title not recognised"))
    assert samples[("medreid_associations_total", rejected)] == 1
    assert total(samples, "medreid_results_total") == 5
    for stage in ("read", "decode", "clahe", "models"):
        count = samples[("medreid_stage_duration_seconds_count", (("stage", stage),))]
        assert count == 5, stage
    assert samples[("medreid_queue_jobs", (("state", "pending"),))] == 0
    assert samples[("medreid_queue_oldest_pending_age_seconds", ())] == 0
    assert samples[("medreid_spool_free_bytes", ())] > 0
    assert ("medreid_open_alerts", (("kind", "image"),)) in samples
    assert ("medreid_database_errors_total", (("component", "scp"),)) in samples
    assert samples[("medreid_ready", (("check", "database"),))] == 1
    assert PATIENT not in body.decode()

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert checked.returncode == 0, checked.stderr.decode() + checked.stdout.decode()

    lines = json_log_lines(service.log())
    stored = [line for line in lines if line["message"].startswith("C-STORE from STORESCU stored")]
    assert {line["sop_instance_uid"] for line in stored} == sent_uids
    assert all(isinstance(line["association"], int) for line in stored)
    assert {"job_id", "worker", "sop_instance_uid"} <= set().union(
        *(line for line in lines if line["message"].startswith("job "))
    )
    assert PATIENT not in service.log()


def test_serve_exits_non_zero_naming_what_is_not_ready(
    sqlite_database: Database, tmp_path: Path
) -> None:
    models = tmp_path / "models" / "compa-broken"
    shutil.copytree(REPO / "models" / "compa-v1", models)
    (models / "weights.npz").write_bytes(b"not the weights")
    service = RunningService.on(
        tmp_path,
        sqlite_database.url,
        MEDREID_MODELS_DIR=str(tmp_path / "models"),
        MEDREID_WORKERS_PROCESSES="1",
        MEDREID_METRICS_STARTUP_TIMEOUT_S="20",
    )
    service.start()
    assert service.exited(timeout=90) == 5
    assert "not ready 20 s after start (metrics.startup_timeout_s): models:" in service.log()


# ---------------------------------------------------------------------------- the database


def test_the_database_goes_away_and_comes_back(database: Database, tmp_path: Path) -> None:
    """The SCP answers 0xA701 meanwhile, /readyz says the database is not ready, the workers
    and the console keep running and resume by themselves, no job is processed twice."""
    port, metrics_port, console_port = free_port(), free_port(), free_port()
    holder: sqlite3.Connection | None = None
    proxy: TcpProxy | None = None
    if database.backend == "postgresql":
        url = make_url(database.url)
        proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
        service_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    else:
        service_url = database.url
    service = RunningService(
        workdir=tmp_path,
        port=port,
        env=service_env(
            tmp_path,
            service_url,
            port,
            MEDREID_METRICS_PORT=str(metrics_port),
            MEDREID_CONSOLE_ENABLED="true",
            MEDREID_CONSOLE_PORT=str(console_port),
            MEDREID_DATABASE_BUSY_TIMEOUT_S="0.5",
            **WITHOUT_MODELS,
        ),
    )
    for args, stdin in (
        (("users", "add", "ops", "--password-stdin"), "a long enough secret\n"),
        (("users", "token", "ops"), ""),
    ):
        made = subprocess.run(
            [sys.executable, "-m", "medreid.cli", *args],
            env={**service.env, "MEDREID_DATABASE_URL": database.url},
            cwd=tmp_path,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
    api = urllib.request.Request(
        f"http://127.0.0.1:{console_port}/api/v1/results",
        headers={"Authorization": f"Bearer {made.stdout.strip()}"},
    )

    def console_status() -> int:
        try:
            with urllib.request.urlopen(api, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    service.start()
    items = datasets(9, seed=5)
    try:
        wait_readyz(metrics_port, ready=True)
        assert console_status() == 200
        assert set(send(items[:3], port).values()) == {StoreStatus.SUCCESS}
        wait_for_queue(database.sessions)

        if proxy is not None:
            proxy.down()
        else:
            # SQLite goes away for writers while another process holds its write lock
            path = make_url(database.url).database
            assert path is not None
            holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN EXCLUSIVE")
        during = send(items[3:6], port)
        assert set(during.values()) == {StoreStatus.OUT_OF_RESOURCES_DATABASE}
        if proxy is not None:
            body = wait_readyz(metrics_port, ready=False)
            assert body["not_ready"] == ["database"]
            assert body["checks"]["workers"]["ok"]
        console_down = console_status()
        time.sleep(3)  # the workers meet the outage on their next polls

        if proxy is not None:
            proxy.up()
        else:
            assert holder is not None
            holder.execute("ROLLBACK")
        wait_readyz(metrics_port, ready=True)
        assert set(send(items[3:], port).values()) == {StoreStatus.SUCCESS}
        wait_for_queue(database.sessions, timeout=60)
        console_up = console_status()
        samples = scrape(metrics_port)
    finally:
        service.stop()
        if holder is not None:
            holder.close()
        if proxy is not None:
            proxy.down()

    assert console_down >= 500  # an error answer, not a dead console
    assert console_up == 200, f"the console did not resume (during the outage: {console_down})"
    assert "restarting it" not in service.log()  # no worker died
    assert samples[("medreid_database_errors_total", (("component", "scp"),))] == 3
    with database.sessions.begin() as session:
        per_instance = session.execute(
            select(Instance.sop_instance_uid, func.count(Result.id))
            .outerjoin(Result, Result.instance_id == Instance.id)
            .group_by(Instance.id, Instance.sop_instance_uid)
        ).all()
        states = session.scalars(select(Job.state)).all()
    assert sorted(uid for uid, _ in per_instance) == sorted(str(d.SOPInstanceUID) for d in items)
    assert {n for _, n in per_instance} == {1}
    assert set(states) == {"done"}


# ---------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize(
    ("point", "quarantined"),
    [("after_staging", 1), ("after_rename", 1), ("after_commit", 0)],
)
def test_sigkill_in_the_store_path_then_every_file_accounted_for(
    database: Database,
    tmp_path: Path,
    point: str,
    quarantined: int,
) -> None:
    """Killed at a fixed point of the third C-STORE; restarted; the sender resends what was
    not acknowledged. Each acknowledged instance is processed exactly once, each spool file
    has its row, and what no row records is in quarantine, audited and counted."""
    port, metrics_port = free_port(), free_port()
    env = service_env(
        tmp_path,
        database.url,
        port,
        MEDREID_METRICS_PORT=str(metrics_port),
        MEDREID_LOGGING_FORMAT="json",
        # one service alone on its spool: what no row records is judged at once, before it
        # listens (a shared spool's settling is tested in test_reconcile)
        MEDREID_SPOOL_RECONCILE_SETTLE_S="0",
        PYTHONPATH=str(REPO),
        **WITHOUT_MODELS,
    )
    crashing = RunningService(
        workdir=tmp_path,
        port=port,
        env={**env, "MEDREID_TEST_CRASH_AT": point, "MEDREID_TEST_CRASH_ON": "3"},
        module="tests.crashpoint",
    )
    crashing.start()
    items = datasets(6, seed=11)
    first = send(items, port)
    crashing.process.wait(timeout=30)  # type: ignore[union-attr]
    acknowledged = [uid for uid, status in first.items() if status == StoreStatus.SUCCESS]
    assert len(acknowledged) == 2, first

    service = RunningService(workdir=tmp_path, port=port, env=env)
    service.start()
    try:
        wait_readyz(metrics_port, ready=True)
        resent = send([ds for ds in items if str(ds.SOPInstanceUID) not in acknowledged], port)
        assert set(resent.values()) == {StoreStatus.SUCCESS}
        wait_for_queue(database.sessions, timeout=60)
        samples = scrape(metrics_port)
    finally:
        service.stop()

    spool = tmp_path / "spool"
    with database.sessions.begin() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.spool_path, func.count(Result.id))
            .outerjoin(Result, Result.instance_id == Instance.id)
            .group_by(Instance.id, Instance.sop_instance_uid, Instance.spool_path)
        ).all()
        audited = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "Spool File Quarantined")
        ).all()
    assert sorted(uid for uid, _, _ in rows) == sorted(str(ds.SOPInstanceUID) for ds in items)
    assert {n for _, _, n in rows} == {1}  # processed exactly once
    in_spool = {
        str(p.relative_to(spool))
        for p in spool.rglob("*")
        if p.is_file() and "quarantine" not in p.relative_to(spool).parts
    }
    assert in_spool == {path for _, path, _ in rows}  # every file has its row, and no other
    in_quarantine = [p for p in (spool / "quarantine").rglob("*") if p.is_file()]
    assert len(in_quarantine) == quarantined
    assert len(audited) == quarantined
    assert samples[("medreid_spool_quarantined_files_total", ())] == quarantined
    if quarantined:
        expected_suffix = ".part" if point == "after_staging" else ".dcm"
        assert in_quarantine[0].name.endswith(expected_suffix)
        assert audited[0].detail["sop_instance_uid"] == str(items[2].SOPInstanceUID)
        assert "moved to" in service.log()
    for line in json_log_lines(service.log()):
        assert PATIENT not in json.dumps(line)


def test_a_file_written_just_before_the_start_is_judged_once_it_has_settled(
    sqlite_database: Database, tmp_path: Path
) -> None:
    """On a shared spool a fresh file may be another live service's: the start leaves it, the
    service listens, and the file is judged spool.reconcile_settle_s later."""
    port, metrics_port = free_port(), free_port()
    staged = tmp_path / "spool" / "7a" / ".1.2.826.0.1.3680043.8.498.7.0123abcd.part"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"DICM")
    future = time.time() + 3600  # newer than any start: always deferred
    os.utime(staged, (future, future))
    service = RunningService(
        workdir=tmp_path,
        port=port,
        env=service_env(
            tmp_path,
            sqlite_database.url,
            port,
            MEDREID_METRICS_PORT=str(metrics_port),
            MEDREID_SPOOL_RECONCILE_SETTLE_S="2",
            **WITHOUT_MODELS,
        ),
    )
    service.start()
    try:
        wait_readyz(metrics_port, ready=True)
        deadline = time.monotonic() + 30
        while staged.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        samples = scrape(metrics_port)
    finally:
        service.stop()
    assert not staged.exists()
    (moved,) = [p for p in (tmp_path / "spool" / "quarantine").rglob("*") if p.is_file()]
    assert moved.name == staged.name and moved.read_bytes() == b"DICM"
    assert samples[("medreid_spool_quarantined_files_total", ())] == 1
    assert "judged again in 2 s" in service.log() and "moved to" in service.log()


def test_a_worker_starting_while_the_database_is_away_waits_for_it_to_load_its_models(
    sqlite_database: Database, tmp_path: Path
) -> None:
    import dataclasses
    import threading

    from medreid.monitoring import WorkerState
    from medreid.processes import _load_models
    from medreid.settings import Settings
    from storage.db import make_engine, make_sessionmaker

    settings = Settings()
    settings = dataclasses.replace(
        settings, models=dataclasses.replace(settings.models, dir=REPO / "models")
    )
    path = make_url(sqlite_database.url).database
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # the database away for the worker's reads and writes
    back = threading.Timer(3.0, lambda: holder.execute("ROLLBACK"))
    back.start()
    engine = make_engine(sqlite_database.url, busy_timeout_s=0.2)
    try:
        started = time.monotonic()
        analyser, state = _load_models(settings, make_sessionmaker(engine), lambda: False)
        waited = time.monotonic() - started
    finally:
        back.join()
        holder.close()
        engine.dispose()
    assert state == WorkerState.READY
    assert analyser is not None and analyser.models.compa is not None
    assert waited >= 2.5  # it waited for the database rather than give up on the models
