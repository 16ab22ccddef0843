"""`medreid serve` as a real process, fed by DCMTK storescu and a pynetdicom SCU.

Every file with pixel data in the pydicom and pydicom-data corpora is sent by both; the
database must then account for every Success: one instance row per distinct content, one
finished job and one result each, decoded with the right shape or failed with a reason.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from storage.models import Instance, Job, Result
from support.corpus import corpus_files
from support.service import (
    RunningService,
    free_port,
    send_with_pynetdicom,
    send_with_storescu,
    service_env,
    wait_for_queue,
)
from tests.conftest import Database

pytestmark = [pytest.mark.slow, pytest.mark.db]

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK (storescu, echoscu) is not installed"
)


def pixel_files() -> list[tuple[Path, str, int, int]]:
    """(path, SOP Instance UID, Rows, Columns) of every corpus file with pixel data."""
    found = []
    for path in corpus_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path)
            if "PixelData" not in ds or "TransferSyntaxUID" not in ds.file_meta:
                continue
            found.append((path, str(ds.SOPInstanceUID), int(ds.Rows), int(ds.Columns)))
        except Exception:
            continue
    return found


@pytest.fixture
def service(database: Database, tmp_path: Path) -> Iterator[RunningService]:
    running = RunningService(
        workdir=tmp_path,
        port=free_port(),
        env=service_env(
            tmp_path,
            database.url,
            0,
            MEDREID_SCP_ALLOWED_PEERS="STORESCU,PYNETDICOM,ECHOSCU",
            MEDREID_WORKERS_PROCESSES="2",
        ),
    )
    running.env["MEDREID_SCP_PORT"] = str(running.port)
    running.start()
    yield running
    running.stop()


@needs_dcmtk
def test_every_corpus_file_is_accounted_for(service: RunningService, database: Database) -> None:
    files = pixel_files()
    assert len(files) > 100, "the test corpora are not installed"
    # The corpora reuse some UIDs for different images: keep every shape seen per UID.
    succeeded: dict[str, set[tuple[int, int]]] = {}
    refused: list[Path] = []
    for path, uid, rows, columns in files:
        by_dcmtk = send_with_storescu(path, service.port)
        by_pynetdicom = send_with_pynetdicom(path, service.port) == 0x0000
        if by_dcmtk or by_pynetdicom:
            succeeded.setdefault(uid, set()).add((rows, columns))
        else:
            refused.append(path)
    # Nearly all of the corpus is valid image data; the refusals are the broken files.
    assert len(succeeded) >= 0.8 * len({uid for _, uid, _, _ in files})
    wait_for_queue(database.sessions)

    with database.sessions.begin() as session:
        instances = session.scalars(select(Instance)).all()
        jobs = session.scalars(select(Job)).all()
        results = session.scalars(select(Result)).all()
    by_uid: dict[str, list[Instance]] = {}
    for instance in instances:
        by_uid.setdefault(instance.sop_instance_uid, []).append(instance)
    jobs_by_instance: dict[int, list[Job]] = {}
    for job in jobs:
        jobs_by_instance.setdefault(job.instance_id, []).append(job)
    results_by_instance: dict[int, list[Result]] = {}
    for result in results:
        results_by_instance.setdefault(result.instance_id, []).append(result)

    # Nothing acknowledged is lost, and nothing is stored that was not acknowledged.
    assert set(succeeded) == set(by_uid)
    for uid, shapes in succeeded.items():
        for instance in by_uid[uid]:
            assert len(jobs_by_instance[instance.id]) == 1
            assert jobs_by_instance[instance.id][0].state in ("done", "failed")
            (result,) = results_by_instance[instance.id]
            if result.status == "ok":
                assert result.shape is not None and tuple(result.shape[1:3]) in shapes
            else:
                assert result.failure_reason, f"{uid} failed without a reason"
    assert len({(i.sop_instance_uid, i.sha256) for i in instances}) == len(instances)
    # storescu proposed each file's own syntax: every uncompressed proposal it offers (-xi,
    # -xe, -xb, -xd) and the compressed ones were received as such
    dcmtk_syntaxes = {i.transfer_syntax_uid for i in instances if i.calling_ae == "STORESCU"}
    uncompressed = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
    assert uncompressed | {"1.2.840.10008.1.2.1.99"} <= dcmtk_syntaxes
    assert len(dcmtk_syntaxes - uncompressed) >= 6, dcmtk_syntaxes
    # A PACS re-sending the same instances gets Success and creates nothing new.
    resent = [path for path, uid, _, _ in files if uid in succeeded][:10]
    assert [send_with_pynetdicom(path, service.port) for path in resent] == [0] * len(resent)
    with database.sessions.begin() as session:
        assert len(session.scalars(select(Instance.id)).all()) == len(instances)
    processed = sum(1 for r in results if r.status == "ok")
    assert processed >= 0.9 * len(results)
    print(
        f"\n{len(files)} corpus files with pixel data; {len(refused)} refused by both senders; "
        f"{len(succeeded)} SOP Instance UIDs acknowledged; {len(instances)} instance versions; "
        f"{processed} decoded, {len(results) - processed} failed with a reason"
    )

    # The administrator's view of the same runs.
    listed = service.cli_json("instances", "--limit", "100000")
    assert {row["sop_instance_uid"] for row in listed} == set(by_uid)
    events = service.cli_json("audit", "--limit", "100000")
    accepted = {e["actor_ae"] for e in events if e["event_type"] == "Association Accepted"}
    assert {"STORESCU", "PYNETDICOM"} <= accepted
    transferred = sum(
        e["detail"]["instances"]
        for e in events
        if e["event"] == "DICOM Instances Transferred" and e["event_type"] is None
    )
    refusals = [e for e in events if e["event_type"] == "Instance Refused"]
    assert refusals and all(e["detail"]["reason"] for e in refusals)
    assert transferred == len(instances)
    assert any(e["event"] == "Query" and e["actor_user"] for e in events)
    used = service.cli_json("audit", "--event", "Audit Log Used")
    assert used and used[-1]["actor_user"]


@needs_dcmtk
def test_echoscu_and_an_unknown_calling_ae(service: RunningService) -> None:
    echo = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "MEDREID", "127.0.0.1", str(service.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    rogue = subprocess.run(
        ["echoscu", "-aet", "ROGUE", "-aec", "MEDREID", "127.0.0.1", str(service.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert rogue.returncode != 0
    assert "Rejected" in rogue.stderr or "rejected" in rogue.stderr.lower()
    alerts = service.cli_json("audit", "--event", "Security Alert")
    assert [(a["actor_ae"], a["actor_host"], a["detail"]["reason"]) for a in alerts] == [
        ("ROGUE", "127.0.0.1", "calling AE title not recognised")
    ]
    rejected_only = service.cli_json("audit", "--ae", "ROGUE", "--outcome", "minor")
    assert len(rejected_only) == 1
