from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from scp import spool as spool_module
from scp.spool import WRITEBACK_SLICE_BYTES, Spool, is_valid_uid

SHA = "ab" * 32


@pytest.mark.parametrize(
    "uid",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        "1.2..3",
        "1.2.3.",
        ".1.2",
        "1.2.3/../../x",
        "1.2.3\x00",
        "1." + "2" * 70,
        "",
        "\uff11.\uff12",  # full-width digits
        "1.2.3 ",
    ],
)
def test_hostile_uids_are_not_uids(uid: str) -> None:
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "2.25.123456789", "0", "1" * 64])
def test_real_uids_are_uids(uid: str) -> None:
    assert is_valid_uid(uid)


def test_a_hostile_uid_never_becomes_a_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        spool.path_for("../../escape", 1, SHA)


def test_write_is_complete_and_inside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.write("1.2.3.4", 1, SHA, (b"head", b"body"))
    assert path.read_bytes() == b"headbody"
    assert path.resolve().is_relative_to((tmp_path / "spool").resolve())
    assert path.name == f"1.2.3.4.v1.{SHA[:12]}.dcm"
    assert spool.absolute(spool.relative(path)) == path
    # no temporary files are left behind
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_versions_of_one_uid_get_different_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.write("1.2.3.4", 1, "1" * 64, (b"one",))
    second = spool.write("1.2.3.4", 2, "2" * 64, (b"two",))
    assert first != second
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    class Boom(bytes):
        pass

    def chunks() -> tuple[bytes, ...]:
        return (b"ok", Boom(b"x"), 42)  # type: ignore[return-value]

    with pytest.raises(TypeError):
        spool.write("1.2.3.5", 1, SHA, chunks())
    assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*"))


def test_fsync_is_called_for_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    spool = Spool(tmp_path / "spool")
    # opening a new spool makes its directories durable
    assert len(calls) == 1
    calls.clear()
    spool.write("1.2.3.6", 1, SHA, (b"data",))
    # the file, and its directory after the rename
    assert len(calls) == 2
    calls.clear()
    Spool(tmp_path / "nosync", fsync=False).write("1.2.3.6", 1, SHA, (b"data",))
    assert calls == []


def test_a_file_staged_without_fsync_is_fsynced_by_sync_or_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bytes] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # files, not their directories
            synced.append(os.pread(fd, 16, 0))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = Spool(tmp_path / "spool")
    synced.clear()
    staged = spool.stage("1.2.3.6", (b"first file",), sync=False)
    assert synced == [] and staged.read_bytes() == b"first file"
    spool.sync(staged)
    assert synced == [b"first file"]
    assert spool.place(staged, "1.2.3.6", 1, SHA).read_bytes() == b"first file"

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    staged = spool.stage("1.2.3.7", (b"second",), sync=False)
    with pytest.raises(OSError, match="Input/output"):
        spool.sync(staged)
    assert not staged.exists()
    # a spool without fsync does none
    unsynced = Spool(tmp_path / "nosync", fsync=False)
    unsynced.sync(unsynced.stage("1.2.3.8", (b"third",), sync=False))


def test_a_large_file_is_written_in_slices_each_sent_to_disk_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        spool_module,
        "_START_WRITEBACK",
        lambda _fd, offset, length: started.append((offset, length)),
    )
    header = b"H" * 132
    dataset = bytes(range(256)) * (WRITEBACK_SLICE_BYTES * 5 // 2 // 256) + b"tail"
    path = Spool(tmp_path / "spool").write("1.2.3.9", 1, SHA, (header, dataset))
    assert path.read_bytes() == header + dataset
    # every full slice followed by more data, in order; the last slice is left to the fsync
    slice_bytes = WRITEBACK_SLICE_BYTES
    assert started == [(len(header), slice_bytes), (len(header) + slice_bytes, slice_bytes)]

    started.clear()
    Spool(tmp_path / "small").write("1.2.3.9", 1, SHA, (header, b"x" * 1000))
    Spool(tmp_path / "nosync", fsync=False).write("1.2.3.9", 1, SHA, (header, dataset))
    assert started == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_by_the_kernel_call_on_linux(tmp_path: Path) -> None:
    start = spool_module._writeback_starter()
    assert start is not None
    with open(tmp_path / "f", "wb", buffering=0) as handle:
        handle.write(b"x" * 8192)
        start(handle.fileno(), 0, 8192)  # returns at once; the data is unchanged
    assert (tmp_path / "f").read_bytes() == b"x" * 8192


def test_the_directories_are_made_when_the_spool_is_opened(tmp_path: Path) -> None:
    Spool(tmp_path / "spool")
    made = sorted(p.name for p in (tmp_path / "spool").iterdir())
    assert len(made) == 256 and made[0] == "00" and made[-1] == "ff"
    assert all((tmp_path / "spool" / name).is_dir() for name in made)


def test_a_directory_removed_after_opening_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    directory = spool.path_for("1.2.3.7", 1, SHA).parent
    directory.rmdir()
    path = spool.write("1.2.3.7", 1, SHA, (b"data",))
    assert path.read_bytes() == b"data"


def test_files_of_the_two_level_layout_still_resolve(tmp_path: Path) -> None:
    # spools written before the single level keep their stored relative paths
    old = tmp_path / "spool" / "ab" / "cd" / "1.2.3.8.v1.abababababab.dcm"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    spool = Spool(tmp_path / "spool")
    assert spool.absolute("ab/cd/1.2.3.8.v1.abababababab.dcm").read_bytes() == b"old"
