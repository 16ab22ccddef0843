"""The SCP through real loopback associations (pynetdicom SCU against our server)."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

import scp.store
from scp.contexts import VERIFICATION_CLASS
from scp.pynetdicom_adapter import guard_requests, is_prompt
from scp.records import Peer, StoreRequest
from scp.server import DicomServer
from scp.status import DatasetUnreadable, StoreStatus, status_for
from storage.models import Association, AuditEvent, Instance, Job
from support.dicom_factory import CT_IMAGE_STORAGE, encode, make_dataset
from tests.conftest import Database, ServerFactory


def ct(uid: str | None = None, value: int = 100, side: int = 4) -> Dataset:
    return make_dataset(
        np.full((side, side), value, dtype=np.uint16), sop_instance_uid=uid, patient_id="PX"
    )


# 4 x 4 is hashed before its write; 512 x 512 (512 KiB) is hashed while it is written
SIDES = pytest.mark.parametrize("side", [4, 512])


def leftovers(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.is_file() and p.suffix != ".dcm"]


def associate(
    server: DicomServer,
    calling: str = "STORESCU",
    called: str = "MEDREID",
    syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 5
    ae.add_requested_context(VERIFICATION_CLASS)
    ae.add_requested_context(CT_IMAGE_STORAGE, list(syntaxes))
    return guard_requests(ae.associate("127.0.0.1", server.port, ae_title=called))


def our_side(server: DicomServer) -> Any:
    """The server's association of the one open now."""
    (acceptor,) = [a for a in server.ae.active_associations if a.is_acceptor]
    return acceptor


def store(server: DicomServer, *datasets: Any) -> list[int]:
    assoc = associate(server)
    assert assoc.is_established
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status))
    assoc.release()
    return statuses


def audit_types(db: Database) -> list[str | None]:
    with db.sessions.begin() as session:
        return list(session.scalars(select(AuditEvent.event_type).order_by(AuditEvent.id)))


def count(db: Database, model: Any) -> int:
    with db.sessions.begin() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_echo(make_server: ServerFactory) -> None:
    assoc = associate(make_server())
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_our_associations_wake_on_work_and_serve_as_before(make_server: ServerFactory) -> None:
    server = make_server()
    assoc = associate(server)
    assert assoc.is_established
    acceptor = our_side(server)
    assert is_prompt(acceptor)
    # messages back to back, each answered in turn
    for n in range(50):
        assert assoc.send_c_echo().Status == 0x0000
        assert int(assoc.send_c_store(ct(value=n)).Status) == 0x0000
    assoc.release()
    assert assoc.is_released


@pytest.mark.parametrize("level", [logging.WARNING, logging.DEBUG])
def test_pynetdicom_narrates_only_where_it_is_logged(
    make_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    level: int,
) -> None:
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "standard")
    caplog.set_level(level, logger="pynetdicom")
    server = make_server()
    assoc = associate(server)
    acceptor = our_side(server)
    assert int(assoc.send_c_store(ct()).Status) == 0x0000
    assoc.release()
    narrated = [r for r in caplog.records if r.getMessage() == "Received Store Request"]
    if level == logging.DEBUG:
        assert acceptor.get_handlers(evt.EVT_DIMSE_RECV) and narrated
    else:
        assert acceptor.get_handlers(evt.EVT_DIMSE_RECV) == [] and not narrated


@SIDES
def test_store_is_durable_and_recorded_before_success(
    make_server: ServerFactory, sqlite_database: Database, tmp_path: Path, side: int
) -> None:
    ds = ct(side=side)
    assert store(make_server(), ds) == [StoreStatus.SUCCESS]
    # the server records the release in its own thread, maybe after the SCU has returned
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with sqlite_database.sessions.begin() as session:
            if session.scalars(select(Association)).one().outcome != "open":
                break
        time.sleep(0.05)
    with sqlite_database.sessions.begin() as session:
        instance = session.scalars(select(Instance)).one()
        job = session.scalars(select(Job)).one()
        association = session.scalars(select(Association)).one()
        assert (instance.sop_instance_uid, instance.patient_id, instance.modality) == (
            ds.SOPInstanceUID,
            "PX",
            "CT",
        )
        assert job.instance_id == instance.id and job.state == "pending"
        assert association.outcome == "released" and association.instances_stored == 1
        spooled = (tmp_path / "spool" / instance.spool_path).read_bytes()
    assert spooled[128:132] == b"DICM"
    # the file holds the dataset bytes exactly as received: their hash is the recorded one
    reread = dcmread(io.BytesIO(spooled))
    assert reread.SOPInstanceUID == ds.SOPInstanceUID
    assert reread.PixelData == ds.PixelData
    body = spooled[file_header_length(spooled) :]
    assert hashlib.sha256(body).hexdigest() == instance.sha256
    assert instance.spool_path.split(".")[-2] == instance.sha256[:12]
    assert leftovers(tmp_path / "spool") == []
    assert audit_types(sqlite_database) == [
        "Association Accepted",
        None,  # DICOM Instances Transferred, one per study
        "Association Released",
    ]


@SIDES
def test_a_failed_fsync_is_never_success_and_leaves_nothing(
    make_server: ServerFactory,
    sqlite_database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    side: int,
) -> None:
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    server = make_server()
    ds = ct(side=side)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    assoc = associate(server)
    answer = assoc.send_c_store(ds)
    assoc.release()
    assert answer.Status == StoreStatus.OUT_OF_RESOURCES
    assert "Input/output error" in answer.ErrorComment
    assert count(sqlite_database, Instance) == 0
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []
    # the disk recovers, and the sender's retry is stored
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store(server, ds) == [StoreStatus.SUCCESS]
    assert count(sqlite_database, Instance) == 1


def file_header_length(part10: bytes) -> int:
    """Preamble, prefix and file meta: (0002,0000) UL holds the rest of the group's length."""
    group_length = struct.unpack("<I", part10[140:144])[0]
    return 144 + int(group_length)


@SIDES
def test_a_resent_identical_instance_is_not_duplicated(
    make_server: ServerFactory,
    sqlite_database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    side: int,
) -> None:
    hashed: list[int] = []
    real_sha256 = scp.store._sha256

    def counting_sha256(data: bytes) -> str:
        hashed.append(len(data))
        return real_sha256(data)

    monkeypatch.setattr(scp.store, "_sha256", counting_sha256)
    ds = ct(side=side)
    server = make_server()
    assert store(server, ds, ds) == [0, 0]
    assert store(server, ds) == [0]
    # each dataset hashed once, though a re-send is tried as new before it is looked up
    assert len(hashed) == 3
    assert count(sqlite_database, Instance) == 1
    assert count(sqlite_database, Job) == 1
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1
    assert leftovers(tmp_path / "spool") == []
    with sqlite_database.sessions.begin() as session:
        instance = session.scalars(select(Instance)).one()
        stored = (tmp_path / "spool" / instance.spool_path).read_bytes()
    assert hashlib.sha256(stored[file_header_length(stored) :]).hexdigest() == instance.sha256


@SIDES
def test_a_resent_instance_with_new_content_is_a_new_version(
    make_server: ServerFactory, sqlite_database: Database, tmp_path: Path, side: int
) -> None:
    uid = generate_uid()
    server = make_server()
    first = ct(uid, 100, side)
    assert store(server, first, ct(uid, 200, side)) == [0, 0]
    # the first again (a duplicate), then a third content
    assert store(server, first, ct(uid, 300, side)) == [0, 0]
    with sqlite_database.sessions.begin() as session:
        versions = session.scalars(select(Instance.version).order_by(Instance.version)).all()
        paths = session.scalars(select(Instance.spool_path)).all()
    assert versions == [1, 2, 3]
    assert len(set(paths)) == 3
    # exactly the recorded files: none left from trying a stored UID as a new one
    spooled = {str(p.relative_to(tmp_path / "spool")) for p in (tmp_path / "spool").rglob("*.dcm")}
    assert spooled == set(paths)
    assert leftovers(tmp_path / "spool") == []


def test_unknown_calling_ae_is_rejected_and_audited(
    make_server: ServerFactory, sqlite_database: Database
) -> None:
    server = make_server(allowed_peers=("PACS", "CT1@127.0.0.1", "MR1@10.255.255.1"))
    rejected = associate(server, calling="ROGUE")
    assert rejected.is_rejected
    wrong_host = associate(server, calling="MR1")
    assert wrong_host.is_rejected
    accepted = associate(server, calling="CT1")
    assert accepted.is_established
    accepted.release()
    with sqlite_database.sessions.begin() as session:
        alerts = session.scalars(
            select(AuditEvent).where(AuditEvent.event == "Security Alert")
        ).all()
        assert [(a.actor_ae, a.actor_host, a.outcome) for a in alerts] == [
            ("ROGUE", "127.0.0.1", 4),
            ("MR1", "127.0.0.1", 4),
        ]
        assert alerts[0].detail["reason"] == "calling AE title not recognised"


def test_wrong_called_ae_is_rejected_unless_allowed(make_server: ServerFactory) -> None:
    strict = make_server()
    assert associate(strict, called="SOMEONE_ELSE").is_rejected
    lenient = make_server(require_called_ae=False)
    assoc = associate(lenient, called="SOMEONE_ELSE")
    assert assoc.is_established
    assoc.release()


def test_too_many_associations_are_rejected_and_audited(
    make_server: ServerFactory, sqlite_database: Database
) -> None:
    server = make_server(max_associations=1)
    first = associate(server)
    assert first.is_established
    second = associate(server)
    assert second.is_rejected
    first.release()
    with sqlite_database.sessions.begin() as session:
        reasons = [
            e.detail["reason"]
            for e in session.scalars(select(AuditEvent).where(AuditEvent.event == "Security Alert"))
        ]
    assert reasons == ["local limit exceeded: too many associations"]


def test_low_disk_answers_out_of_resources(
    make_server: ServerFactory, sqlite_database: Database
) -> None:
    server = make_server(min_free_bytes=2**62)
    assert store(server, ct()) == [StoreStatus.OUT_OF_RESOURCES]
    assert count(sqlite_database, Instance) == 0
    assert "Instance Refused" in audit_types(sqlite_database)


def test_database_unavailable_is_never_success(make_server: ServerFactory, tmp_path: Path) -> None:
    broken = create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'db.sqlite3'}")
    server = make_server(sessions=sessionmaker(broken))
    assert store(server, ct()) == [StoreStatus.OUT_OF_RESOURCES_DATABASE]
    assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*"))


@pytest.mark.parametrize("can_tell", [True, False])
def test_a_failed_commit_is_never_success_and_keeps_a_file_only_when_in_doubt(
    make_server: ServerFactory,
    sqlite_database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    can_tell: bool,
) -> None:
    def failing_commit(_connection: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    server = make_server()
    event.listen(sqlite_database.engine, "commit", failing_commit)
    if not can_tell:
        # nor can the database say afterwards whether the row is there
        monkeypatch.setattr(
            server.store, "_discard_unless_recorded", lambda _p: failing_commit(None)
        )
    try:
        assert store(server, ct()) == [StoreStatus.OUT_OF_RESOURCES_DATABASE]
    finally:
        event.remove(sqlite_database.engine, "commit", failing_commit)
    assert count(sqlite_database, Instance) == 0
    kept = list((tmp_path / "spool").rglob("*.dcm"))
    # the file goes where the database says the row is not there, and stays where it cannot
    assert len(kept) == (0 if can_tell else 1)
    assert leftovers(tmp_path / "spool") == []
    # and the service goes on: the connection whose commit failed is not used again
    monkeypatch.undo()
    assert store(server, ct()) == [StoreStatus.SUCCESS]
    assert count(sqlite_database, Instance) == 1


def _send_file(server: DicomServer, path: Path) -> Dataset:
    """Send a file's bytes as they are: no decoding and re-encoding by the sender."""
    assoc = associate(server, syntaxes=(ExplicitVRLittleEndian,))
    assert assoc.is_established
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return status


def test_an_unparseable_dataset_gets_cannot_understand(
    make_server: ServerFactory, sqlite_database: Database, tmp_path: Path
) -> None:
    good = encode(ct())
    # Keep the elements up to the SOP Instance UID (the sender reads those), then an
    # element whose length runs past the end of the data.
    study_tag = good.index(b"\x20\x00\x0d\x00UI")  # (0020,000D)
    garbage = good[:study_tag] + b"\x20\x00\x0d\x00UI\xff\x7f" + b"1.2" * 10
    path = tmp_path / "garbage.dcm"
    path.write_bytes(garbage)
    status = _send_file(make_server(), path)
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert "cannot be parsed" in status.ErrorComment
    assert count(sqlite_database, Instance) == 0
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


def test_a_dataset_that_contradicts_its_command_is_refused(
    make_server: ServerFactory, sqlite_database: Database, tmp_path: Path
) -> None:
    ds = ct()
    data = encode(ds)
    # The file meta (which becomes the command) names another instance than the dataset.
    uid = ds.SOPInstanceUID.encode()
    other = uid[:-1] + (b"2" if uid[-1:] != b"2" else b"3")
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(data.replace(uid, other, 1))
    status = _send_file(make_server(), path)
    assert status.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert count(sqlite_database, Instance) == 0
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("uid", ["1.2.3/../../../../tmp/evil", "1.2.x", "1.2.3..", "/etc/passwd"])
def test_uids_built_to_escape_the_spool_are_refused(
    make_server: ServerFactory, sqlite_database: Database, tmp_path: Path, uid: str
) -> None:
    ds = ct()
    ds.SOPInstanceUID = UID(uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    path = tmp_path / "hostile.dcm"
    path.write_bytes(encode(ds))
    status = _send_file(make_server(), path)
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert count(sqlite_database, Instance) == 0
    assert not any(p.is_file() for p in tmp_path.parent.rglob("evil*"))


def test_the_service_keeps_serving_after_refusals(make_server: ServerFactory) -> None:
    server = make_server()
    bad = ct()
    bad.SOPInstanceUID = "1.2.x"
    assoc = associate(server)
    assert assoc.send_c_store(bad).Status != 0
    assert assoc.send_c_store(ct()).Status == 0
    assoc.release()
    assert store(server, ct()) == [0]


def test_a_dataset_uid_over_64_characters_is_refused_never_cut(
    make_server: ServerFactory, sqlite_database: Database
) -> None:
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * 42
    assert len(long_uid) == 68
    ds = ct()
    ds.SOPInstanceUID = UID(long_uid)
    # the command carries the first 64 characters, which the dataset's would once be cut to
    # (pynetdicom will not send such a command, so the request is made here as scp/ makes it)
    request = StoreRequest(
        association_key=1,
        peer=Peer(calling_ae="SENDER", called_ae="MEDREID", host="127.0.0.1", port=1),
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uid=long_uid[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        file_header=b"",
        dataset=encode(ds)[file_header_length(encode(ds)) :],
    )
    with pytest.raises(DatasetUnreadable) as refused:
        make_server().store.store(request, association_id=None)
    assert status_for(refused.value) == (
        StoreStatus.CANNOT_UNDERSTAND,
        "SOPInstanceUID of 68 characters, over 64",
    )
    assert count(sqlite_database, Instance) == 0


def test_a_multi_valued_patient_id_is_stored_as_dicom_writes_it_in_private_files(
    make_server: ServerFactory, sqlite_database: Database, tmp_path: Path
) -> None:
    ds = ct()
    ds.PatientID = ["A", "B"]
    assert store(make_server(), ds) == [StoreStatus.SUCCESS]
    with sqlite_database.sessions.begin() as session:
        instance = session.scalars(select(Instance)).one()
        assert instance.patient_id == "A\\B"
        spooled = tmp_path / "spool" / instance.spool_path
    # the spool is the service user's alone: files 0600, folders 0700
    assert spooled.stat().st_mode & 0o777 == 0o600
    assert spooled.parent.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
