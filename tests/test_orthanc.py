"""Orthanc as the hospital's PACS, forwarding to medreid both ways a hospital does it: a Lua
rule on every instance it receives by C-STORE, and an explicit store to a configured modality
through its REST API. Every forwarded instance must arrive and be processed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from storage.models import Association, AuditEvent, Instance, Result
from support.service import RunningService, free_port, service_env, wait_for_queue
from synthetic.hospital import SynthOptions, generate, read_manifest
from tests.conftest import Database

ORTHANC = shutil.which("Orthanc")
pytestmark = [
    pytest.mark.db,
    pytest.mark.skipif(
        ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)"
    ),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed"),
]

FORWARD_RULE = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  -- what arrives by C-STORE goes on to medreid; uploads are sent explicitly
  if origin['RequestOrigin'] == 'DicomProtocol' then
    SendToModality(instanceId, 'medreid')
  end
end
"""


class Orthanc:
    def __init__(self, workdir: Path, medreid_port: int, dicom_port: int | None = None) -> None:
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "forward.lua").write_text(FORWARD_RULE)
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"medreid": ["MEDREID", "127.0.0.1", medreid_port]},
            "LuaScripts": [str(workdir / "forward.lua")],
            "Plugins": [],
            # close each forwarding association at once, so its audit is written at once
            "DicomAssociationCloseDelay": 0,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log = (workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [str(ORTHANC), str(workdir / "orthanc.json")], stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        return self.request("POST", path, body)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


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
