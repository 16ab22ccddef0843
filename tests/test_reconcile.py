"""Start-up reconciliation of the spool, in process: what a kill can leave in the spool and what
the next start does with each kind of file."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from medreid.monitoring import Readiness
from medreid.reconcile import READINESS_PROBE_PREFIX, Reconciliation, reconcile_spool
from storage.instances import record_instance
from storage.models import AuditEvent
from tests.conftest import Database
from tests.test_storage import new_instance

NOW = dt.datetime(2026, 12, 7, 9, 30, tzinfo=dt.UTC)
UID = "1.2.826.0.1.3680043.8.498.1"


def reconcile(
    spool: Path, database: Database, *, settle_s: float = 0.0, only: list[Path] | None = None
) -> Reconciliation:
    return reconcile_spool(
        spool,
        database.sessions,
        clock=lambda: NOW,
        actor_user="ops",
        actor_ae="MEDREID",
        settle_s=settle_s,
        only=only,
    )


def moved(result: Reconciliation) -> list[str]:
    return [q.relative_path for q in result.quarantined]


def audited_files(database: Database) -> list[str]:
    with database.sessions.begin() as session:
        return sorted(d["file"] for d in session.scalars(select(AuditEvent.detail)))


def written(path: Path, seconds_ago: float = 0.0) -> Path:
    path.write_bytes(b"DICM")
    then = time.time() - seconds_ago
    os.utime(path, (then, then))
    return path


def test_a_probe_left_by_a_kill_is_removed_and_a_staged_file_quarantined(
    database: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    probe = spool / f"{READINESS_PROBE_PREFIX}0123abcd"
    probe.write_bytes(b"")
    written(spool / "00" / f".{UID}.9f3c.part")

    assert moved(reconcile(spool, database)) == [f"00/.{UID}.9f3c.part"]

    assert not probe.exists()
    left = sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())
    assert left == [f"quarantine/20261207T093000Z/00/.{UID}.9f3c.part"]
    assert audited_files(database) == [f"00/.{UID}.9f3c.part"]  # the probe is no event


def test_a_probe_name_below_the_root_is_not_taken_for_a_probe(
    database: Database, tmp_path: Path
) -> None:
    """Only the root holds probes; a file of that name deeper down is not the service's own and
    is left where it is."""
    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    foreign = spool / "00" / f"{READINESS_PROBE_PREFIX}kept"
    foreign.write_bytes(b"x")

    assert moved(reconcile(spool, database)) == []
    assert foreign.read_bytes() == b"x"


def test_on_a_shared_spool_what_was_just_written_is_judged_once_it_has_settled(
    database: Database, tmp_path: Path
) -> None:
    """Another live service's files, between its write and its commit, look like a dead one's
    orphans: a file written within settle_s is judged later, by itself. By then the live
    service has recorded or moved its files; the dead one's are still there, and go."""
    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    old_part = written(spool / "00" / f".{UID}.1.aaaa.part", seconds_ago=300)
    live_part = written(spool / "00" / f".{UID}.2.bbbb.part")  # being written
    live_placed = written(spool / "00" / f"{UID}.3.v1.{'c' * 12}.dcm")  # its commit under way
    dead_placed = written(spool / "00" / f"{UID}.4.v1.{'d' * 12}.dcm")  # its service killed
    recorded = written(spool / "00" / f"{UID}.5.v1.{'e' * 12}.dcm")  # fresh, its row committed
    with database.sessions.begin() as session:
        record_instance(
            session,
            new=new_instance(f"{UID}.5"),
            version=1,
            spool_path=str(recorded.relative_to(spool)),
        )

    first = reconcile(spool, database, settle_s=60.0)
    assert moved(first) == [f"00/{old_part.name}"]
    assert first.kept == 1  # a recorded file is kept whatever its age
    assert sorted(first.deferred) == sorted([live_part, live_placed, dead_placed])
    assert live_part.exists() and live_placed.exists() and dead_placed.exists()

    # the live service goes on: its .part is placed under another name, its file gets its row
    live_part.unlink()
    with database.sessions.begin() as session:
        record_instance(
            session,
            new=new_instance(f"{UID}.3"),
            version=1,
            spool_path=str(live_placed.relative_to(spool)),
        )
    second = reconcile(spool, database, only=first.deferred)
    assert moved(second) == [f"00/{dead_placed.name}"]
    assert second.kept == 1 and second.deferred == []
    assert live_placed.exists() and not dead_placed.exists()
    assert audited_files(database) == sorted([f"00/{old_part.name}", f"00/{dead_placed.name}"])


def test_a_file_recorded_while_it_was_judged_goes_back(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resend of the very instance, received by a running service while its orphan was
    judged, is placed and recorded under the same name: the file returns to its row's place."""
    from medreid import reconcile as module

    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    placed = written(spool / "00" / f"{UID}.4.v1.{'d' * 12}.dcm", seconds_ago=300)
    answers = iter([set(), {f"00/{placed.name}"}])  # no row when judged, a row just after
    monkeypatch.setattr(module, "recorded_spool_paths", lambda session, **_: next(answers))

    result = reconcile(spool, database)
    assert moved(result) == [] and result.kept == 1
    assert placed.read_bytes() == b"DICM"
    assert audited_files(database) == []


def test_without_settling_everything_is_judged_at_once(database: Database, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    fresh = written(spool / "00" / f".{UID}.2.bbbb.part")
    result = reconcile(spool, database)
    assert moved(result) == [f"00/{fresh.name}"] and result.deferred == []


def test_the_readiness_probe_leaves_the_spool_as_it_found_it(
    database: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    readiness = Readiness(
        engine=database.engine, spool_root=spool, min_free_bytes=0, workers=lambda: []
    )
    try:
        check = readiness.spool()
    finally:
        readiness.close()
    assert check.ok, check
    assert list(spool.iterdir()) == []
