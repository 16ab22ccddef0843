"""A worker over the real queue and pipeline (in process), on each database backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from medreid.worker import Worker
from pipeline.runner import PipelineConfig, run_pipeline
from storage.instances import NewInstance, add_instance_with_job
from storage.models import AuditEvent, Instance, Job, Result
from support.corpus import corpus_file
from support.dicom_factory import encode, make_dataset
from tests.conftest import Database

pytestmark = pytest.mark.db


def enqueue(db: Database, spool: Path, name: str, data: bytes, uid: str) -> int:
    (spool / name).write_bytes(data)
    with db.sessions.begin() as session:
        instance = add_instance_with_job(
            session,
            new=NewInstance(
                sop_instance_uid=uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.3.4",
                patient_id="P1",
                modality="CT",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size_bytes=len(data),
                sha256=f"{abs(hash(data)):064d}"[:64],
                calling_ae="TEST",
                peer_host="127.0.0.1",
                association_id=None,
            ),
            version=1,
            spool_path=name,
        )
        return instance.id


def make_worker(db: Database, spool: Path) -> Worker:
    return Worker(sessions=db.sessions, config=PipelineConfig(), name="test/1/0", spool_root=spool)


def test_worker_stores_one_result_per_job(database: Database, tmp_path: Path) -> None:
    pixels = (np.arange(64 * 48, dtype=np.uint16) % 4096).reshape(64, 48)
    ds = make_dataset(pixels, RescaleSlope=1, RescaleIntercept=-1024)
    good = enqueue(database, tmp_path, "good.dcm", encode(ds), ds.SOPInstanceUID)
    rle = enqueue(
        database, tmp_path, "rle.dcm", corpus_file("MR_small_RLE.dcm").read_bytes(), "1.9.1"
    )
    no_pixels = make_dataset(pixels)
    del no_pixels.PixelData
    bad = enqueue(database, tmp_path, "bad.dcm", encode(no_pixels), "1.9.2")
    missing = enqueue(database, tmp_path, "gone.dcm", b"", "1.9.3")
    (tmp_path / "gone.dcm").unlink()

    worker = make_worker(database, tmp_path)
    assert worker.run_once() == 4
    assert worker.run_once() == 0

    with database.sessions.begin() as session:
        results = {r.instance_id: r for r in session.scalars(select(Result))}
        states = {i.id: i.state for i in session.scalars(select(Instance))}
        jobs = session.scalars(select(Job)).all()
        alerts = session.scalars(select(AuditEvent)).all()
    assert len(results) == 4
    assert {j.state for j in jobs} == {"done", "failed"}
    assert results[good].status == "ok" and results[good].shape == [1, 64, 48]
    assert results[good].frames_analysed == [0] and results[good].frames_total == 1
    assert set(results[good].timings_ms) == {"read", "decode", "clahe"}
    assert results[good].parameters["clahe"]["clip_limit"] == 2.0
    stats = results[good].stats_decoded
    assert stats is not None and 0.0 <= stats["min"] <= stats["mean"] <= stats["max"] <= 1.0
    assert results[rle].status == "ok" and results[rle].shape == [1, 64, 64]
    assert (results[bad].failed_stage, results[bad].failure_reason) == (
        "decode",
        "the dataset has no Pixel Data",
    )
    assert results[missing].failed_stage == "read"
    assert "missing" in (results[missing].failure_reason or "")
    assert states == {good: "processed", rle: "processed", bad: "failed", missing: "failed"}
    failures = [a for a in alerts if a.event_type == "Processing Failure"]
    assert {a.detail["sop_instance_uid"] for a in failures} == {"1.9.2", "1.9.3"}


def test_pipeline_on_a_multiframe_colour_image(tmp_path: Path) -> None:
    frames = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    frames[1, :, :, 0] = 200
    path = tmp_path / "rgb.dcm"
    path.write_bytes(
        encode(make_dataset(frames, photometric="RGB", sop_class_uid="1.2.840.10008.5.1.4.1.1.7"))
    )
    result = run_pipeline(path, PipelineConfig())
    assert result.ok and result.decoded is not None and result.enhanced is not None
    assert result.decoded.frames_analysed == (1,)
    assert result.enhanced.shape == (1, 8, 8, 3)
    # the red frame stays red after CLAHE on lightness
    assert float(result.enhanced[0, :, :, 0].mean()) > float(result.enhanced[0, :, :, 1].mean())


class BrokenAnalyser:
    """A model that raises on every batch."""

    def refresh(self) -> None:
        pass

    def analyse(self, images: list[np.ndarray], headers: list[object]) -> list[object]:
        raise RuntimeError("out of memory in the model")


def test_a_failing_model_leaves_results_without_verdicts(
    database: Database, tmp_path: Path
) -> None:
    ds = make_dataset(np.full((8, 8), 100, dtype=np.uint16))
    instance_id = enqueue(database, tmp_path, "one.dcm", encode(ds), ds.SOPInstanceUID)
    worker = Worker(
        sessions=database.sessions,
        config=PipelineConfig(),
        name="test/1/0",
        spool_root=tmp_path,
        analyser=BrokenAnalyser(),  # type: ignore[arg-type]
    )
    assert worker.run_once() == 1
    with database.sessions.begin() as session:
        result = session.scalars(select(Result).where(Result.instance_id == instance_id)).one()
        assert result.status == "ok" and result.shape == [1, 8, 8]
        assert result.identity_verdict is None and result.modality_verdict is None
        assert "models failed: RuntimeError: out of memory" in (result.failure_reason or "")


class NewPatientAnalyser:
    """Every image is of someone not yet enrolled."""

    def refresh(self) -> None:
        pass

    def analyse(self, images: list[np.ndarray], headers: list[object]) -> list[object]:
        from pipeline.analysis import Analysis
        from pipeline.verdicts import IdentityDecision, IdentityVerdict, ModalityVerdict

        return [
            Analysis(
                predicted_modality="ct",
                modality_scores={"ct": 1.0},
                modality_verdict=ModalityVerdict.AGREE,
                routed_to="ct",
                top_matches=[],
                identity=IdentityDecision(IdentityVerdict.NEW_PATIENT, None, None, None),
                threshold=0.8,
                versions={"compa": "compa-x", "reid:ct": "reid-ct-x"},
                embedding=np.array([0.6, 0.8], dtype=np.float32),
            )
            for _ in images
        ]


@pytest.mark.parametrize("policy", [True, False])
def test_new_patients_are_enrolled_only_under_the_policy(
    database: Database, tmp_path: Path, policy: bool
) -> None:
    from storage.models import GalleryEntry

    ds = make_dataset(np.full((8, 8), 100, dtype=np.uint16))
    instance_id = enqueue(database, tmp_path, "new.dcm", encode(ds), ds.SOPInstanceUID)
    worker = Worker(
        sessions=database.sessions,
        config=PipelineConfig(),
        name="test/1/0",
        spool_root=tmp_path,
        analyser=NewPatientAnalyser(),  # type: ignore[arg-type]
        auto_enroll=policy,
    )
    assert worker.run_once() == 1
    with database.sessions.begin() as session:
        entries = session.scalars(select(GalleryEntry)).all()
        result = session.scalars(select(Result).where(Result.instance_id == instance_id)).one()
        assert result.identity_verdict == "new_patient"
        if policy:
            (entry,) = entries
            assert (entry.patient_id, entry.modality, entry.model_version) == (
                "P1",
                "ct",
                "reid-ct-x",
            )
            assert entry.source_instance_id == instance_id
            assert np.frombuffer(entry.embedding, dtype="<f4").tolist() == pytest.approx([0.6, 0.8])
            enrolled = session.scalars(
                select(AuditEvent).where(AuditEvent.event_type == "Gallery Enrollment")
            ).all()
            assert len(enrolled) == 1 and enrolled[0].patient_id == "P1"
        else:
            assert entries == []


def test_one_result_that_cannot_be_stored_does_not_hold_back_its_batch(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import IntegrityError

    import medreid.worker as worker_module

    ids = []
    for n in range(3):
        ds = make_dataset(np.full((8, 8), 100 + n, dtype=np.uint16))
        ids.append(enqueue(database, tmp_path, f"{n}.dcm", encode(ds), ds.SOPInstanceUID))
    real_finish = worker_module.finish_job

    def finish_job(session: object, *, job: object, **kwargs: Any) -> bool:
        if getattr(job, "instance_id", None) == ids[1]:
            raise IntegrityError("INSERT INTO results", {}, Exception("refused by a constraint"))
        return real_finish(session, job=job, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module, "finish_job", finish_job)
    worker = make_worker(database, tmp_path)
    assert worker.run_once() == 3
    assert worker.processed == 2
    with database.sessions.begin() as session:
        stored = {r.instance_id for r in session.scalars(select(Result))}
        states = {j.instance_id: j.state for j in session.scalars(select(Job))}
    assert stored == {ids[0], ids[2]}
    assert states[ids[1]] == "running"  # claimed again when its lease runs out


class CountingAnalyser(NewPatientAnalyser):
    """Records the size of every batch the models see."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def analyse(self, images: list[np.ndarray], headers: list[object]) -> list[object]:
        self.batches.append(len(images))
        return super().analyse(images, headers)


def test_large_images_reach_the_models_in_chunks_of_bounded_memory(
    sqlite_database: Database, tmp_path: Path
) -> None:
    for n in range(5):
        ds = make_dataset(np.full((64, 64), 100 + n, dtype=np.uint16))
        enqueue(sqlite_database, tmp_path, f"{n}.dcm", encode(ds), ds.SOPInstanceUID)
    analyser = CountingAnalyser()
    worker = Worker(
        sessions=sqlite_database.sessions,
        config=PipelineConfig(),
        name="test/1/0",
        spool_root=tmp_path,
        analyser=analyser,  # type: ignore[arg-type]
        batch_size=8,
        max_chunk_values=2 * 2 * 64 * 64,  # two images: decoded and enhanced, one channel
    )
    assert worker.run_once() == 5
    assert analyser.batches == [2, 2, 1]
    assert worker.processed == 5


def test_a_failed_job_and_each_mismatch_raise_their_own_alert() -> None:
    from medreid.worker import audit_records
    from storage.jobs import ClaimedJob, JobOutcome

    job = ClaimedJob(1, 2, 1, "x.dcm", "1.2.3.4", "P2", "1.2.3", modality="CT")
    both = JobOutcome(
        ok=True,
        parameters={},
        timings_ms={},
        predicted_modality="xray",
        modality_verdict="mismatch",
        identity_verdict="mismatch",
        matched_patient_id="P3",
        identity_threshold=0.5,
    )
    records = audit_records(job, both, "w1")
    assert [r.kind.event_type for r in records] == ["Modality Mismatch", "Patient Mismatch"]
    assert all(
        (r.actor_user, r.patient_id, r.study_instance_uid) == ("w1", "P2", "1.2.3")
        and r.detail["sop_instance_uid"] == "1.2.3.4"
        for r in records
    )
    assert records[0].detail["header_modality"] == "CT"
    assert records[0].detail["predicted"] == "xray"
    assert records[1].detail["looks_like"] == "P3"
    failed = JobOutcome(ok=False, parameters={}, timings_ms={}, failed_stage="decode")
    (failure,) = audit_records(job, failed, "w1")
    assert failure.kind.event_type == "Processing Failure"
    assert failure.detail["stage"] == "decode"
    assert audit_records(job, JobOutcome(ok=True, parameters={}, timings_ms={}), "w1") == []
