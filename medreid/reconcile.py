"""Start-up reconciliation of the spool with the database, before the SCP listens.

A file whose row exists is kept: its job, if unfinished, is queued again as usual. A staged
``.part`` file (the service died while writing it) and a placed file with no row (it died
after the rename, before the commit) were never acknowledged, so the sender still holds them;
they are moved to ``<spool>/quarantine/<time>/``, keeping their relative path, never deleted.
Each is logged, counted in the metrics and audited. A readiness probe (``.readyz-*``, empty,
named only where the file system has no O_TMPFILE) that a kill left at the root holds no data
and is removed.

Several services may share one spool. A file no row records that was written within the last
``settle_s`` seconds may be another live service's, between its write and its commit, so it is
not quarantined at start: it is returned as deferred and judged again, alone, once it has had
that long to get its row. Only such files are looked at for their age.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from storage import audit
from storage.audit_trail import append_audit
from storage.instances import recorded_spool_paths

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
PART_SUFFIX = ".part"
READINESS_PROBE_PREFIX = ".readyz-"


@dataclass(frozen=True)
class Quarantined:
    relative_path: str  # where it was, under the spool root
    moved_to: str  # where it is now, under the spool root
    reason: str
    sop_instance_uid: str | None


@dataclass(frozen=True)
class Reconciliation:
    kept: int
    quarantined: list[Quarantined]
    deferred: list[Path]  # unrecorded, written within settle_s: perhaps a live service's


def uid_of(name: str) -> str | None:
    """The SOP Instance UID in a spool file's name: ``<uid>.v<n>.<sha>.dcm`` or
    ``.<uid>.<hex>.part``."""
    if name.endswith(PART_SUFFIX) and name.startswith("."):
        parts = name[1 : -len(PART_SUFFIX)].rsplit(".", 1)
        return parts[0] if len(parts) == 2 else None
    if name.endswith(".dcm"):
        parts = name[: -len(".dcm")].rsplit(".", 2)
        return parts[0] if len(parts) == 3 and parts[1].startswith("v") else None
    return None


def _spool_files(root: Path) -> Iterable[Path]:
    """Every file of the spool but the quarantine's; a readiness probe a kill left is removed."""
    for directory, folders, files in os.walk(root):
        here = Path(directory)
        if here == root:
            folders[:] = [f for f in folders if f != QUARANTINE]
        for name in files:
            if here == root and name.startswith(READINESS_PROBE_PREFIX):
                (here / name).unlink(missing_ok=True)
                log.info("spool: removed %s, a readiness probe left by a kill", name)
                continue
            yield here / name


def _settled(
    files: list[tuple[Path, str]], settle_s: float
) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The files written more than ``settle_s`` ago, and the others (gone ones are neither:
    placed or discarded since by the service that wrote them)."""
    settled_before = time.time() - settle_s
    settled: list[tuple[Path, str]] = []
    recent: list[Path] = []
    for path, reason in files:
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if written > settled_before:
            recent.append(path)
        else:
            settled.append((path, reason))
    return settled, recent


def reconcile_spool(
    root: Path,
    sessions: sessionmaker[Session],
    *,
    clock: Callable[[], dt.datetime],
    actor_user: str,
    actor_ae: str,
    settle_s: float = 0.0,
    only: Iterable[Path] | None = None,
) -> Reconciliation:
    """Quarantine what no row records; ``only``: judge just these files (those deferred by an
    earlier call), not the whole spool."""
    root = root.resolve()
    quarantine_root = root / QUARANTINE
    candidates: dict[str, list[Path]] = defaultdict(list)  # UID -> its placed files
    parts: list[Path] = []
    for path in _spool_files(root) if only is None else only:
        if path.name.endswith(PART_SUFFIX):
            parts.append(path)
        elif path.name.endswith(".dcm") and (uid := uid_of(path.name)) is not None:
            candidates[uid].append(path)
    with sessions.begin() as session:
        recorded = recorded_spool_paths(session, sop_instance_uids=candidates)
    kept = 0
    unrecorded: list[tuple[Path, str]] = [(p, "staged, never placed (.part)") for p in parts]
    for paths in candidates.values():
        for path in paths:
            if str(path.relative_to(root)) in recorded:
                kept += 1
            else:
                unrecorded.append((path, "placed, but no row records it"))
    # only a file no row records is looked at again: whether it was written too recently
    orphans, deferred = _settled(unrecorded, settle_s) if settle_s else (unrecorded, [])
    if not orphans:
        return Reconciliation(kept=kept, quarantined=[], deferred=deferred)

    now = clock()
    target = quarantine_root / now.strftime("%Y%m%dT%H%M%SZ")
    moved: list[Quarantined] = []
    for path, reason in sorted(orphans):
        relative = path.relative_to(root)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, destination)
        except FileNotFoundError:  # renamed or removed meanwhile by the service that wrote it
            continue
        moved.append(
            Quarantined(
                relative_path=str(relative),
                moved_to=str(destination.relative_to(root)),
                reason=reason,
                sop_instance_uid=uid_of(path.name),
            )
        )
    # A placed file is named by its UID, version and digest: a resend of that very instance,
    # received by a running service while the file was judged, is placed and recorded under
    # the same name. Such a file goes back where its row says it is.
    placed = {
        q.sop_instance_uid
        for q in moved
        if q.sop_instance_uid is not None and not q.relative_path.endswith(PART_SUFFIX)
    }
    if placed:
        with sessions.begin() as session:
            recorded_now = recorded_spool_paths(session, sop_instance_uids=placed)
        for item in [q for q in moved if q.relative_path in recorded_now]:
            os.replace(root / item.moved_to, root / item.relative_path)
            moved.remove(item)
            kept += 1
            log.warning("spool: %s was recorded while it was judged; kept", item.relative_path)
    with sessions.begin() as session:
        for item in moved:
            append_audit(
                session,
                record=audit.AuditRecord(
                    kind=audit.SPOOL_FILE_QUARANTINED,
                    outcome=audit.Outcome.MINOR_FAILURE,
                    actor_user=actor_user,
                    actor_ae=actor_ae,
                    detail={
                        "file": item.relative_path,
                        "moved_to": item.moved_to,
                        "reason": item.reason,
                        "sop_instance_uid": item.sop_instance_uid,
                    },
                ),
            )
    return Reconciliation(kept=kept, quarantined=moved, deferred=deferred)
