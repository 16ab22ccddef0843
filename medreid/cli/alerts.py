"""`medreid alerts list|show|confirm|dismiss`: the review worklist from the command line.
Every look and every decision is audited, with the OS user as the reviewer."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from medreid.cli.common import _audit_listing
from medreid.output import FORMATS, render
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Alert, Clock

ALERT_COLUMNS = (
    "id",
    "state",
    "kind",
    "scope",
    "raised_at",
    "patient_id",
    "suspected_patient_id",
    "header_modality",
    "predicted_modality",
    "study_instance_uid",
    "reviewed_by",
)
STATES = ("open", "confirmed", "dismissed", "all")
KINDS = ("modality_mismatch", "patient_mismatch")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alerts = commands.add_parser("alerts", help="the review worklist: list, show, decide")
    actions = alerts.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="alerts, open ones first")
    listing.add_argument("--state", choices=STATES, default="open")
    listing.add_argument("--kind", choices=KINDS)
    listing.add_argument("--patient", help="header or suspected patient ID")
    listing.add_argument("--study", help="Study Instance UID")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--format", choices=FORMATS, default="table")
    show = actions.add_parser("show", help="one alert with what it was judged on")
    show.add_argument("alert_id", type=int, metavar="ID")
    confirm = actions.add_parser("confirm", help="confirm an open alert: a real mismatch")
    confirm.add_argument("alert_id", type=int, metavar="ID")
    confirm.add_argument("--reason", help="what was found (optional)")
    dismiss = actions.add_parser("dismiss", help="dismiss an open alert as a false alarm")
    dismiss.add_argument("alert_id", type=int, metavar="ID")
    dismiss.add_argument("--reason", required=True, help="why it is a false alarm")
    dismiss.add_argument(
        "--enroll",
        action="store_true",
        help="a patient mismatch: also enroll the image under its header patient, whose it is",
    )


def alert_row(alert: Alert) -> dict[str, Any]:
    return {c.key: getattr(alert, c.key) for c in alert.__table__.columns}


def cmd_alerts(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database, os_user
    from storage import audit
    from storage.alerts import (
        AlertQuery,
        AlertReviewError,
        list_alerts,
        review_alert,
        review_audit,
    )
    from storage.audit_trail import append_audit
    from storage.models import Alert, AlertState

    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            if args.action == "list":
                found, total = list_alerts(
                    session,
                    where=AlertQuery.named(
                        args.state,
                        args.kind,
                        patient=args.patient,
                        study=args.study,
                        limit=args.limit,
                    ),
                )
                rows = [alert_row(a) for a in found]
                _audit_listing(
                    session, audit.QUERY, args, listing="alerts", rows=len(rows), state=args.state
                )
                print(render(rows, args.format, ALERT_COLUMNS))
                if args.format == "table" and total > len(rows):
                    print(f"({total} match; --limit shows more)")
                return 0
            if args.action == "show":
                alert = session.get(Alert, args.alert_id)
                if alert is None:
                    raise SystemExit(f"medreid alerts: no alert {args.alert_id}")
                _audit_listing(session, audit.QUERY, args, listing="alert", alert_id=alert.id)
                print(json.dumps(alert_row(alert), indent=2, default=str))
                return 0
            decision = AlertState.CONFIRMED if args.action == "confirm" else AlertState.DISMISSED
            reviewer = os_user()
            enroll = bool(getattr(args, "enroll", False))
            try:
                alert = review_alert(
                    session,
                    alert_id=args.alert_id,
                    decision=decision,
                    reviewer=reviewer,
                    reason=args.reason,
                    now=clock(),
                    enroll=enroll,
                )
            except AlertReviewError as exc:
                raise SystemExit(f"medreid alerts {args.action}: {exc}") from None
            for record in review_audit(
                alert,
                actor_user=reviewer,
                actor_host=os.uname().nodename,
                interface="cli",
                enrolled=enroll,
                occurred_at=clock(),
            ):
                append_audit(session, record=record)
            if enroll:
                print(f"image enrolled under {alert.patient_id} ({alert.embedding_model})")
            print(f"alert {alert.id}: {alert.state} by {reviewer}")
            return 0
    finally:
        engine.dispose()


COMMANDS = {"alerts": cmd_alerts}
