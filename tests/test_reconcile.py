"""Start-up reconciliation of the spool, in process: what a kill can leave in the spool and what
the next start does with each kind of file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import select

from medreid.monitoring import Readiness
from medreid.reconcile import READINESS_PROBE_PREFIX, reconcile_spool
from storage.models import AuditEvent
from tests.conftest import Database

NOW = dt.datetime(2026, 12, 7, 9, 30, tzinfo=dt.UTC)
UID = "1.2.826.0.1.3680043.8.498.1"


def reconcile(spool: Path, database: Database) -> list[str]:
    result = reconcile_spool(
        spool, database.sessions, clock=lambda: NOW, actor_user="ops", actor_ae="MEDREID"
    )
    return [q.relative_path for q in result.quarantined]


def test_a_probe_left_by_a_kill_is_removed_and_a_staged_file_quarantined(
    database: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    probe = spool / f"{READINESS_PROBE_PREFIX}0123abcd"
    probe.write_bytes(b"")
    staged = spool / "00" / f".{UID}.9f3c.part"
    staged.write_bytes(b"DICM")

    assert reconcile(spool, database) == [f"00/.{UID}.9f3c.part"]

    assert not probe.exists()
    left = sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())
    assert left == [f"quarantine/20261207T093000Z/00/.{UID}.9f3c.part"]
    with database.sessions.begin() as session:
        audited = session.scalars(select(AuditEvent.detail)).all()
    assert [d["file"] for d in audited] == [f"00/.{UID}.9f3c.part"]  # the probe is no event


def test_a_probe_name_below_the_root_is_not_taken_for_a_probe(
    database: Database, tmp_path: Path
) -> None:
    """Only the root holds probes; a file of that name deeper down is not the service's own and
    is left where it is."""
    spool = tmp_path / "spool"
    (spool / "00").mkdir(parents=True)
    foreign = spool / "00" / f"{READINESS_PROBE_PREFIX}kept"
    foreign.write_bytes(b"x")

    assert reconcile(spool, database) == []
    assert foreign.read_bytes() == b"x"


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
