"""Faults: the database going away mid-association, a disk below its watermark and a full disk
(a real small tmpfs), and ten storescu processes of 200 instances each at once. Never Success
without a durable record; recovery when the resource returns; every instance accounted for."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from scp.contexts import IMAGE_STORAGE_CLASSES
from scp.server import DicomServer
from scp.settings import ScpSettings
from scp.spool import Spool
from scp.status import StoreStatus
from scp.store import StoreService
from storage.db import make_engine, make_sessionmaker
from storage.models import Association, AuditEvent, Instance, Job
from support.dicom_factory import encode, make_dataset
from support.service import RunningService, free_port, service_env, wait_for_queue
from tests.conftest import Database, ServerFactory
from tests.test_scp import associate, ct


class TcpProxy:
    """A loopback TCP proxy that can cut every connection and refuse new ones, as a database
    server that goes away does."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(32)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown wakes the thread blocked in accept(); close alone would not
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def statuses(server: DicomServer, n: int) -> list[int]:
    assoc = associate(server)
    assert assoc.is_established
    out = [int(assoc.send_c_store(ct(value=100 + i)).Status) for i in range(n)]
    assoc.release()
    return out


def count(db: Database) -> int:
    with db.sessions.begin() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


@pytest.mark.db
def test_the_database_going_away_mid_association_is_never_success(
    database: Database, make_server: ServerFactory, tmp_path: Path
) -> None:
    if database.backend == "postgresql":
        url = make_url(database.url)
        proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
        engine = make_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
        cut, restore = proxy.down, proxy.up
    else:
        # SQLite "goes away" for a writer when another process holds the write lock longer
        # than the busy timeout.
        engine = make_engine(database.url, busy_timeout_s=0.3)
        path = make_url(database.url).database
        assert path is not None
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

        def cut() -> None:
            holder.execute("BEGIN EXCLUSIVE")

        def restore() -> None:
            holder.execute("ROLLBACK")

    server = make_server(sessions=make_sessionmaker(engine))
    assoc = associate(server)
    assert assoc.is_established
    before = [int(assoc.send_c_store(ct(value=i)).Status) for i in range(3)]
    cut()
    during = [int(assoc.send_c_store(ct(value=10 + i)).Status) for i in range(3)]
    restore()
    after = [int(assoc.send_c_store(ct(value=20 + i)).Status) for i in range(3)]
    assoc.release()
    engine.dispose()
    assert before == [StoreStatus.SUCCESS] * 3
    assert during == [StoreStatus.OUT_OF_RESOURCES_DATABASE] * 3
    assert after == [StoreStatus.SUCCESS] * 3
    # exactly the acknowledged instances are recorded, and only their files are in the spool
    assert count(database) == 6
    assert len([p for p in (tmp_path / "spool").rglob("*.dcm")]) == 6


def _mount_small_disk(mount: Path) -> str | None:
    """Mount a 4 MiB filesystem on ``mount``: a tmpfs, or where that is refused, an ext4 image
    on a loop device. None when mounted, else why not."""
    tmpfs = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if tmpfs.returncode == 0:
        return None
    image = mount.parent / "small.ext4"
    with image.open("wb") as f:
        f.truncate(4 << 20)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-b", "4096", "-m", "0", str(image)], capture_output=True
    )
    loop = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True)
    if made.returncode == 0 and loop.returncode == 0:
        return None
    return (
        f"cannot mount a small filesystem here: tmpfs: {tmpfs.stderr.decode().strip()}; "
        f"ext4 image on a loop device: {(made.stderr or loop.stderr).decode().strip()}"
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    refused = _mount_small_disk(mount)
    if refused is not None:
        pytest.skip(refused)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def spool_server(db: Database, spool: Path, min_free_bytes: int) -> DicomServer:
    store = StoreService(
        spool=Spool(spool),
        sessions=db.sessions,
        min_free_bytes=min_free_bytes,
        supported_sop_classes=frozenset(IMAGE_STORAGE_CLASSES.values()),
    )
    settings = ScpSettings(port=0, bind_address="127.0.0.1", acse_timeout_s=5.0)
    server = DicomServer(settings=settings, store=store, sessions=db.sessions)
    server.start()
    return server


def fill(disk: Path, leave_bytes: int) -> Path:
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with ballast.open("wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return ballast


def test_a_disk_below_its_watermark_answers_a700_and_recovers(
    sqlite_database: Database, small_disk: Path
) -> None:
    server = spool_server(sqlite_database, small_disk / "spool", min_free_bytes=1 << 20)
    try:
        assert statuses(server, 1) == [StoreStatus.SUCCESS]
        ballast = fill(small_disk, 512 << 10)  # half a megabyte left: below the watermark
        assert statuses(server, 2) == [StoreStatus.OUT_OF_RESOURCES] * 2
        ballast.unlink()  # space returns
        assert statuses(server, 2) == [StoreStatus.SUCCESS] * 2
    finally:
        server.stop()
    assert count(sqlite_database) == 3


def _dataset_filling_its_last_page(page: int = 4096) -> tuple[bytes, int]:
    """A file whose dataset ends 200 bytes short of a page boundary: with the preamble and
    file meta the spooled file needs one page more than the dataset alone."""
    ds = make_dataset(np.zeros((256, 256), dtype=np.uint16), patient_id="PX")

    def dataset_bytes() -> int:
        data = encode(ds)
        return len(data) - (144 + int.from_bytes(data[140:144], "little"))

    # an Image Comments element (8 bytes of header in explicit VR) pads the dataset
    ds.ImageComments = "x" * ((page - 200 - dataset_bytes() - 8) % page)
    data = encode(ds)
    body = len(data) - (144 + int.from_bytes(data[140:144], "little"))
    assert body % page == page - 200, body % page
    return data, body


def test_a_full_disk_answers_a700_and_leaves_no_partial_file(
    sqlite_database: Database, small_disk: Path
) -> None:
    spool = small_disk / "spool"
    server = spool_server(sqlite_database, spool, min_free_bytes=0)  # no watermark
    try:
        assert statuses(server, 1) == [StoreStatus.SUCCESS]  # the spool's folders exist
        data, body = _dataset_filling_its_last_page()
        path = small_disk.parent / "big.dcm"
        path.write_bytes(data)
        # exactly the dataset's pages are free: the free-space check passes, the write cannot
        ballast = fill(small_disk, -(-body // 4096) * 4096)
        from pydicom import dcmread

        assoc = associate(server)
        status = assoc.send_c_store(dcmread(path))
        assoc.release()
        assert status.Status == StoreStatus.OUT_OF_RESOURCES
        assert status.ErrorComment == "spool disk full"
        assert len([p for p in spool.rglob("*") if p.is_file()]) == 1  # no partial file
        ballast.unlink()
        assert statuses(server, 1) == [StoreStatus.SUCCESS]
    finally:
        server.stop()
    assert count(sqlite_database) == 2
    with sqlite_database.sessions.begin() as session:
        refused = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "Instance Refused")
        ).all()
        assert [r.detail.get("reason") for r in refused] == ["spool disk full"]


@pytest.mark.db
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed")
def test_ten_storescu_processes_of_200_instances_at_once(
    database: Database, tmp_path: Path
) -> None:
    folders = []
    for sender in range(10):
        folder = tmp_path / f"sender{sender}"
        folder.mkdir()
        for n in range(200):
            ds = make_dataset(
                np.full((32, 32), sender * 200 + n, dtype=np.uint16), patient_id=f"S{sender}"
            )
            (folder / f"{n:03d}.dcm").write_bytes(encode(ds))
        folders.append(folder)
    port = free_port()
    service = RunningService(
        workdir=tmp_path,
        port=port,
        env=service_env(tmp_path, database.url, port, MEDREID_WORKERS_BATCH_SIZE="64"),
    )
    service.start()
    try:
        senders = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aet",
                    f"MOD{i}",
                    "-aec",
                    "MEDREID",
                    "+sd",
                    "127.0.0.1",
                    str(port),
                    str(folder),
                ],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i, folder in enumerate(folders)
        ]
        for process in senders:
            assert process.wait(timeout=600) == 0, process.stderr.read() if process.stderr else ""
        wait_for_queue(database.sessions, timeout=600)
        time.sleep(0.5)  # the last association's end is recorded in its own thread
    finally:
        service.stop()
    with database.sessions.begin() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 2000
        jobs = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        assert dict(jobs) == {"done": 2000}
        associations = session.scalars(select(Association)).all()
        assert len(associations) == 10
        assert {a.outcome for a in associations} == {"released"}
        assert sorted(a.instances_stored for a in associations) == [200] * 10
