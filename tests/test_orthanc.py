"""Orthanc as the hospital's PACS, forwarding to medreid both ways a hospital does it: a Lua
rule on every instance it receives by C-STORE, and an explicit store to a configured modality
through its REST API. Every forwarded instance must arrive and be processed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from medreid.orthanc import ORTHANC, Orthanc
from storage.models import Association, AuditEvent, Instance, Result
from support.service import RunningService, free_port, service_env, wait_for_queue
from synthetic.hospital import SynthOptions, generate, read_manifest
from tests.conftest import Database

pytestmark = [
    pytest.mark.db,
    pytest.mark.skipif(
        ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)"
    ),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed"),
]


@pytest.fixture
def medreid(database: Database, tmp_path: Path) -> Iterator[RunningService]:
    port = free_port()
    service = RunningService(
        workdir=tmp_path,
        port=port,
        # only the PACS may send, from its host
        env=service_env(
            tmp_path, database.url, port, MEDREID_SCP_ALLOWED_PEERS="ORTHANC@127.0.0.1"
        ),
    )
    service.start()
    yield service
    service.stop()


@pytest.fixture
def orthanc(medreid: RunningService, tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", medreid.port)
    yield pacs
    pacs.stop()


def test_orthanc_forwards_by_rule_and_by_explicit_store(
    medreid: RunningService, orthanc: Orthanc, database: Database, tmp_path: Path
) -> None:
    hospital = tmp_path / "hospital"
    generate(SynthOptions(out=hospital, patients=4, visits=1, seed=5, slices=2))
    rows = list(read_manifest(hospital / "manifest.csv"))
    by_rule = rows[::2]
    by_rest = rows[1::2]

    # 1. A modality sends to the PACS; its Lua rule forwards each instance to medreid.
    sent = subprocess.run(
        ["storescu", "-aet", "CT1", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port)]
        + [str(hospital / r["path"]) for r in by_rule],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr

    # 2. Files uploaded to the PACS, then sent to the medreid modality through REST.
    ids = [orthanc.post("/instances", (hospital / r["path"]).read_bytes())["ID"] for r in by_rest]
    job = orthanc.post(
        "/modalities/medreid/store", json.dumps({"Resources": ids, "Synchronous": True}).encode()
    )
    assert job["InstancesCount"] == len(by_rest) and job["FailedInstancesCount"] == 0

    wanted = {r["sop_instance_uid"] for r in rows}
    deadline = time.monotonic() + 120
    arrived: set[str] = set()
    while time.monotonic() < deadline and arrived != wanted:
        with database.sessions.begin() as session:
            arrived = set(session.scalars(select(Instance.sop_instance_uid)))
        time.sleep(0.3)
    assert arrived == wanted
    wait_for_queue(database.sessions, timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # associations are audited when they close
        with database.sessions.begin() as session:
            open_ones = session.scalars(
                select(Association).where(Association.outcome == "open")
            ).all()
        if not open_ones:
            break
        time.sleep(0.3)
    with database.sessions.begin() as session:
        instances = session.scalars(select(Instance)).all()
        results = {r.instance_id: r for r in session.scalars(select(Result))}
        transferred = session.scalars(
            select(AuditEvent).where(AuditEvent.event == "DICOM Instances Transferred")
        ).all()
        assert {i.calling_ae for i in instances} == {"ORTHANC"}
        assert all(results[i.id].status == "ok" for i in instances)
        assert {a.actor_ae for a in transferred} == {"ORTHANC"}
        assert sum(a.detail.get("instances", 0) for a in transferred) == len(rows)
    # the PACS saw every forward succeed
    assert len(orthanc.get("/instances")) == len(rows)
