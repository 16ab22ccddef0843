"""SIGKILL in the middle of a study: every acknowledged instance is processed exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from scp.pynetdicom_adapter import guard_requests
from storage.models import AuditEvent, Instance, Job, Result
from support.dicom_factory import CT_IMAGE_STORAGE, make_dataset
from support.service import RunningService, free_port, service_env, wait_for_queue
from tests.conftest import Database

pytestmark = [pytest.mark.slow, pytest.mark.db]

STUDY_SIZE = 400


def study() -> list[Dataset]:
    rng = np.random.default_rng(7)
    study_uid = generate_uid()
    return [
        make_dataset(
            rng.integers(0, 4096, size=(256, 256), dtype=np.uint16),
            study_uid=study_uid,
            patient_id="CRASH01",
            RescaleSlope=1,
            RescaleIntercept=-1024,
            InstanceNumber=i + 1,
        )
        for i in range(STUDY_SIZE)
    ]


def send(datasets: list[Dataset], port: int, acked: list[str], stop_after: int | None) -> None:
    """Send until done, the association dies, or ``stop_after`` acknowledgements."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    assoc = guard_requests(ae.associate("127.0.0.1", port, ae_title="MEDREID"))
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                return  # the association went away: not acknowledged
            if status.Status == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
            if stop_after is not None and len(acked) >= stop_after:
                return
    except Exception:
        return
    finally:
        if assoc.is_established:
            assoc.release()


def test_sigkill_mid_study_then_exactly_once(database: Database, tmp_path: Path) -> None:
    port = free_port()
    service = RunningService(
        workdir=tmp_path,
        port=port,
        env=service_env(
            tmp_path,
            database.url,
            port,
            # workers poll once a second, so a backlog is in flight when the crash comes
            MEDREID_WORKERS_BATCH_SIZE="16",
            MEDREID_WORKERS_POLL_INTERVAL_S="1.0",
        ),
    )
    service.start()
    datasets = study()
    acked: list[str] = []
    sender = threading.Thread(target=send, args=(datasets, port, acked, None))
    sender.start()
    deadline = time.monotonic() + 120
    while len(acked) < STUDY_SIZE // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.is_alive(), "the sender finished before the crash: the study is too small"
    service.kill()  # the service and its workers, mid-association and mid-processing
    sender.join(timeout=60)
    acked_before_crash = list(acked)
    assert STUDY_SIZE // 3 <= len(acked_before_crash) < STUDY_SIZE

    with database.sessions.begin() as session:
        unfinished = session.scalar(
            select(func.count()).select_from(Job).where(Job.state.in_(["pending", "running"]))
        )
    assert unfinished, "the workers had caught up before the crash: nothing was in flight"

    # The PACS retries what was not acknowledged, as it would after an aborted association.
    service.start()
    remaining = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(acked)]
    send(remaining, port, acked, None)
    assert sorted(acked) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    wait_for_queue(database.sessions)
    service.stop()

    with database.sessions.begin() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, func.count(Result.id))
            .outerjoin(Result, Result.instance_id == Instance.id)
            .group_by(Instance.id, Instance.sop_instance_uid)
        ).all()
        job_states = session.scalars(select(Job.state)).all()
        restart = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.event_type == "Application Start")
            .order_by(AuditEvent.id)
        ).all()
    results_per_uid = dict(rows)
    # every acknowledged instance is there, exactly once, processed exactly once
    assert len(rows) == STUDY_SIZE
    assert set(results_per_uid) == set(acked)
    assert set(results_per_uid.values()) == {1}
    assert set(job_states) == {"done"}
    assert len(restart) == 2
    print(
        f"acknowledged before the crash: {len(acked_before_crash)}; "
        f"unfinished jobs at the crash: {unfinished}; "
        f"jobs re-queued at restart: {restart[1].detail['jobs_requeued']}"
    )
