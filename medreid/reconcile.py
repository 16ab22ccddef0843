"""Start-up reconciliation of the spool with the database, before the SCP listens.

A file whose row exists is kept: its job, if unfinished, is queued again as usual. A staged
``.part`` file (the service died while writing it) and a placed file with no row (it died
after the rename, before the commit) were never acknowledged, so the sender still holds them;
they are moved to ``<spool>/quarantine/<time>/``, keeping their relative path, never deleted.
Each is logged, counted in the metrics and audited. A readiness probe (``.readyz-*``, empty,
named only where the file system has no O_TMPFILE) that a kill left at the root holds no data
and is removed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections import defaultdict
from collections.abc import Callable
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


def reconcile_spool(
    root: Path,
    sessions: sessionmaker[Session],
    *,
    clock: Callable[[], dt.datetime],
    actor_user: str,
    actor_ae: str,
) -> Reconciliation:
    root = root.resolve()
    quarantine_root = root / QUARANTINE
    candidates: dict[str, list[Path]] = defaultdict(list)  # UID -> its placed files
    parts: list[Path] = []
    for directory, folders, files in os.walk(root):
        here = Path(directory)
        if here == root:
            folders[:] = [f for f in folders if f != QUARANTINE]
        for name in files:
            path = here / name
            if here == root and name.startswith(READINESS_PROBE_PREFIX):
                path.unlink(missing_ok=True)
                log.info("spool: removed %s, a readiness probe left by a kill", name)
                continue
            if name.endswith(PART_SUFFIX):
                parts.append(path)
            elif name.endswith(".dcm") and (uid := uid_of(name)) is not None:
                candidates[uid].append(path)
    with sessions.begin() as session:
        recorded = recorded_spool_paths(session, sop_instance_uids=candidates)
    kept = 0
    orphans: list[tuple[Path, str]] = [(p, "staged, never placed (.part)") for p in parts]
    for paths in candidates.values():
        for path in paths:
            if str(path.relative_to(root)) in recorded:
                kept += 1
            else:
                orphans.append((path, "placed, but no row records it"))
    if not orphans:
        return Reconciliation(kept=kept, quarantined=[])

    now = clock()
    target = quarantine_root / now.strftime("%Y%m%dT%H%M%SZ")
    moved: list[Quarantined] = []
    for path, reason in sorted(orphans):
        relative = path.relative_to(root)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
        moved.append(
            Quarantined(
                relative_path=str(relative),
                moved_to=str(destination.relative_to(root)),
                reason=reason,
                sop_instance_uid=uid_of(path.name),
            )
        )
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
    return Reconciliation(kept=kept, quarantined=moved)
