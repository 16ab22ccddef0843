"""What the command groups share: listing filters, times, progress bars, audit of looks."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
from typing import TYPE_CHECKING, Any, Self

from medreid.output import FORMATS, parse_when
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    pass
log = logging.getLogger("medreid")


def _add_listing_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO date/time, or relative: 30m, 12h, 7d")
    parser.add_argument("--until", help="ISO date/time, or relative: 30m, 12h, 7d")
    parser.add_argument("--patient", help="patient ID")
    parser.add_argument("--study", help="Study Instance UID")
    parser.add_argument("--ae", help="calling AE title of the sender")
    parser.add_argument("--limit", type=int, default=1000, help="newest N rows (default 1000)")
    parser.add_argument("--format", choices=FORMATS, default="table")


def _when(value: str | None, option: str, now: dt.datetime) -> Any:
    if value is None:
        return None
    try:
        return parse_when(value, now)
    except ValueError as exc:
        raise SystemExit(f"medreid: {option}: {exc}") from None


def _audit_listing(session: Any, kind: Any, args: argparse.Namespace, **detail: Any) -> None:
    """Every look at the audit trail or the results is itself an audit event, with the user."""
    from medreid.app import os_user
    from storage import audit
    from storage.audit_trail import append_audit

    append_audit(
        session,
        record=audit.AuditRecord(
            kind=kind,
            actor_user=os_user(),
            actor_host=os.uname().nodename,
            patient_id=getattr(args, "patient", None),
            study_instance_uid=getattr(args, "study", None),
            detail={"interface": "cli", **detail},
        ),
    )


class _Bar:
    """A tqdm bar, closed when its ``with`` block ends."""

    bar: Any

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class _Progress(_Bar):
    """A tqdm bar driven by (done, total) callbacks; quiet when stderr is not a terminal."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=description, unit="img", disable=None, leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()


def _pipeline_config(settings: Settings) -> Any:
    from medreid.app import pipeline_config

    return pipeline_config(settings)


def _brightness(text: str | None) -> tuple[float, float] | None:
    if not text or text == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit("medreid: --brightness takes LOW,HIGH, e.g. 0.8,1.2") from None
    return (low, high)
