"""Hostile input on real loopback associations: garbage on the wire, pixel data that lies,
contexts nobody supports, and a seeded fuzz run of mutated datasets. Each gets the right DIMSE
status or a recorded failure with its reason, and the service keeps serving."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select

from medreid.worker import Worker
from pipeline.runner import PipelineConfig
from scp.pynetdicom_adapter import guard_requests
from scp.server import DicomServer
from scp.status import StoreStatus
from storage.models import Association, AuditEvent, Instance, Job, Result
from support.dicom_factory import CT_IMAGE_STORAGE, encode, make_dataset
from tests.conftest import Database, ServerFactory
from tests.test_scp import associate, ct, store


def drain(db: Database, spool: Path) -> dict[str, Result]:
    """Run a worker until the queue is empty; the results by SOP Instance UID."""
    worker = Worker(sessions=db.sessions, config=PipelineConfig(), name="t/1/0", spool_root=spool)
    while worker.run_once():
        pass
    with db.sessions.begin() as session:
        rows = session.execute(
            select(Result, Instance).join(Instance, Instance.id == Result.instance_id)
        ).all()
        session.expunge_all()
    return {i.sop_instance_uid: r for r, i in rows}


def wait_for_association_end(db: Database, timeout: float = 5.0) -> list[Association]:
    deadline = time.monotonic() + timeout
    while True:
        with db.sessions.begin() as session:
            rows = list(session.scalars(select(Association).order_by(Association.id)))
            session.expunge_all()
        if all(a.outcome != "open" for a in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_garbage_on_an_open_association_aborts_it_and_nothing_else(
    make_server: ServerFactory, sqlite_database: Database
) -> None:
    server = make_server(network_timeout_s=3.0)
    assoc = associate(server)
    assert assoc.is_established
    # bytes that are no PDU at all, in the middle of an association
    assoc.dul.socket.socket.sendall(b"\x99" + bytes(range(256)) * 8)
    deadline = time.monotonic() + 5
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_alive()
    (row,) = wait_for_association_end(sqlite_database)
    assert row.outcome == "aborted"
    # garbage before any association, too
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            while raw.recv(1024):
                pass
        except OSError:
            pass
    assert store(server, ct()) == [StoreStatus.SUCCESS]


def test_unknown_sop_classes_and_unsupported_syntaxes_are_refused_per_context(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.3.4.5.6.7.8.9", ExplicitVRLittleEndian)  # no such SOP class
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.4.100")  # MPEG2: unsupported
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = guard_requests(ae.associate("127.0.0.1", server.port, ae_title="MEDREID"))
    assert assoc.is_established
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    assert accepted == {(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)}
    assert len(assoc.rejected_contexts) == 2
    assert assoc.send_c_store(ct()).Status == StoreStatus.SUCCESS
    assoc.release()


@pytest.mark.db
def test_pixel_data_that_lies_is_kept_and_fails_with_its_reason(
    database: Database, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(sessions=database.sessions)
    short = make_dataset(np.full((16, 16), 7, dtype=np.uint16), patient_id="PX")
    short.PixelData = short.PixelData[:100]  # fewer bytes than Rows x Columns x 2
    many = make_dataset(np.full((16, 16), 7, dtype=np.uint16), patient_id="PX")
    many.NumberOfFrames = 40  # frames the data does not hold
    empty = make_dataset(np.full((16, 16), 7, dtype=np.uint16), patient_id="PX")
    empty.PixelData = b""
    absent = make_dataset(np.full((16, 16), 7, dtype=np.uint16), patient_id="PX")
    del absent.PixelData
    cases = {"short": short, "many": many, "empty": empty, "absent": absent}
    # the archive keeps what the modality sent: the SCP stores them all...
    assert store(server, *cases.values()) == [StoreStatus.SUCCESS] * 4
    # ...and the pipeline records why it could not read each one
    results = drain(database, tmp_path / "spool")
    for name, ds in cases.items():
        result = results[ds.SOPInstanceUID]
        assert result.status == "failed", name
        assert result.failed_stage == "decode" and result.failure_reason, name
    with database.sessions.begin() as session:
        failures = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "Processing Failure")
        ).all()
        assert len(failures) == 4


def _mutate(data: bytes, body: int, rng: random.Random) -> bytes:
    """One to four seeded mutations of the bytes after ``body`` (the sender must still read
    the UIDs before it)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(body, len(out))
        kind = rng.randrange(6)
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)  # a bit flip
        elif kind == 1:
            out[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xff\xff\x00\x00", b"\0\0\0\0"])
        elif kind == 2:
            del out[at : at + rng.randint(1, 64)]  # a hole
        elif kind == 3:
            out[at:at] = rng.randbytes(rng.randint(1, 64))  # noise inserted
        elif kind == 4:
            del out[at:]  # truncated
        else:
            out[at : at + 8] = out[body : body + 8]  # an element header repeated elsewhere
        if len(out) <= body + 1:
            out += b"\0"
    return bytes(out)


@pytest.mark.db
def test_mutated_datasets_crash_nothing_and_every_success_is_kept(
    database: Database, make_server: ServerFactory, tmp_path: Path
) -> None:
    server: DicomServer = make_server(sessions=database.sessions)
    rng = random.Random(20261126)
    bases = []
    for n in range(25):
        ds = make_dataset(
            np.full((24, 24), n * 40, dtype=np.uint16), patient_id=f"FUZZ{n}", SeriesNumber=n
        )
        data = encode(ds)
        # mutate after the dataset's own SOP Instance UID (the file meta repeats it first)
        body = data.index(ds.SOPInstanceUID.encode(), data.index(b"\x08\x00\x18\x00UI"))
        bases.append((data, body + 64))
    folder = tmp_path / "fuzz"
    folder.mkdir()
    statuses: dict[int, int] = {}
    kept: set[tuple[str, str]] = set()
    sent = unsendable = 0
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are
    assoc: Any = None
    # A thousand on SQLite; the parsing they stress is the same on PostgreSQL, where a few
    # hundred prove that every Success is stored there too.
    to_send = 1000 if database.backend == "sqlite" else 300
    started = time.monotonic()
    try:
        while sent < to_send:
            if assoc is None or not assoc.is_established or not assoc.is_alive():
                assoc = associate(server, syntaxes=(ExplicitVRLittleEndian,))
                assert assoc.is_established, "the server stopped accepting associations"
            data, body = rng.choice(bases)
            mutated = _mutate(data, body, rng)
            path = folder / f"{sent + unsendable}.dcm"
            path.write_bytes(mutated)
            try:
                status = assoc.send_c_store(path)
            except Exception:  # the sender itself could not read it: nothing went out
                unsendable += 1
                continue
            sent += 1
            code = int(getattr(status, "Status", -1))
            statuses[code] = statuses.get(code, 0) + 1
            if code == StoreStatus.SUCCESS:
                from pydicom import dcmread

                uid = str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
                kept.add((uid, hashlib.sha256(mutated).hexdigest()))
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc is not None and assoc.is_established:
            assoc.release()
    print(f"\nfuzz: {sent} sent ({unsendable} unsendable) in {time.monotonic() - started:.0f} s;"
          f" statuses {dict(sorted(statuses.items()))}")  # fmt: skip
    # every answer is a status we document (-1: no answer, which must not happen)
    assert set(statuses) <= {int(s) for s in StoreStatus}
    assert statuses.get(StoreStatus.SUCCESS, 0) > 0 and len(statuses) > 1
    # every Success is in the database under its UID...
    with database.sessions.begin() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
        instances = session.scalar(select(func.count()).select_from(Instance))
    assert {uid for uid, _ in kept} <= uids
    assert instances is not None and instances <= len(kept)
    # ...and every job ends, with a result or a failure and its reason
    results = drain(database, tmp_path / "spool")
    with database.sessions.begin() as session:
        jobs = session.scalars(select(Job)).all()
        assert {j.state for j in jobs} <= {"done", "failed"}
    assert all(r.status == "ok" or r.failure_reason for r in results.values())
    assert store(server, ct()) == [StoreStatus.SUCCESS]  # still serving
