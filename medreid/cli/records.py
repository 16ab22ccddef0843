"""`medreid audit`, `instances` and `results`: what was received, found and done (each look
audited)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from medreid.cli.common import _add_listing_filters, _audit_listing, _when
from medreid.output import FORMATS, render
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from sqlalchemy.orm import Session

    from storage.models import Clock
log = logging.getLogger("medreid")


AUDIT_COLUMNS = (
    "id",
    "occurred_at",
    "event",
    "event_type",
    "outcome",
    "actor_ae",
    "actor_host",
    "actor_user",
    "patient_id",
    "study_instance_uid",
    "detail",
)
INSTANCE_COLUMNS = (
    "id",
    "received_at",
    "calling_ae",
    "patient_id",
    "modality",
    "sop_instance_uid",
    "version",
    "state",
    "shape",
    "failure_reason",
)

RESULT_COLUMNS = (
    "id",
    "created_at",
    "calling_ae",
    "patient_id",
    "modality",
    "predicted_modality",
    "modality_verdict",
    "identity_verdict",
    "matched_patient_id",
    "best_score",
    "status",
)


# What a JSON listing holds of each row (the columns above are the table's and the CSV's).
INSTANCE_FIELDS = (
    "id",
    "received_at",
    "calling_ae",
    "peer_host",
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "version",
    "modality",
    "transfer_syntax_uid",
    "size_bytes",
    "sha256",
    "state",
)
INSTANCE_RESULT_FIELDS = (
    "shape",
    "frames_analysed",
    "failed_stage",
    "failure_reason",
    "timings_ms",
)
RESULT_INSTANCE_FIELDS = (
    "calling_ae",
    "patient_id",
    "modality",
    "study_instance_uid",
    "sop_instance_uid",
)
RESULT_FIELDS = (
    "status",
    "failure_reason",
    "predicted_modality",
    "modality_scores",
    "modality_verdict",
    "identity_verdict",
    "matched_patient_id",
)

SERIES_COLUMNS = (
    "id",
    "decided_at",
    "patient_id",
    "header_modality",
    "images",
    "predicted_modality",
    "modality_verdict",
    "identity_verdict",
    "matched_patient_id",
    "header_score",
    "best_other_score",
    "revision",
)


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit_parser = commands.add_parser("audit", help="query the audit trail (itself audited)")
    _add_listing_filters(audit_parser)
    audit_parser.add_argument("--event", help="event or event type, e.g. 'Security Alert'")
    audit_parser.add_argument("--host", help="peer host")
    audit_parser.add_argument("--user", help="the acting user (console users, OS users)")
    audit_parser.add_argument(
        "--outcome",
        choices=["success", "minor", "serious", "major"],  # storage.audit.OUTCOME_NAMES
        help="event outcome",
    )
    instances = commands.add_parser("instances", help="list received instances and results")
    _add_listing_filters(instances)
    instances.add_argument("--state", choices=["queued", "processed", "failed"])
    results = commands.add_parser("results", help="list pipeline results and verdicts")
    results.add_argument("--verdict", help="e.g. mismatch, consistent, new_patient, agree")
    results.add_argument("--study", help="Study Instance UID")
    results.add_argument("--patient", help="header or matched patient ID")
    results.add_argument(
        "--since",
        help="received since (with --series: decided since); ISO date/time, or 30m, 12h, 7d",
    )
    results.add_argument("--limit", type=int, default=1000)
    results.add_argument("--format", choices=FORMATS, default="table")
    results.add_argument(
        "--series",
        action="store_true",
        help="list the series verdicts (CT and MR series, once complete) instead of images",
    )


def _listing(
    settings: Settings,
    args: argparse.Namespace,
    columns: tuple[str, ...],
    fetch: Callable[[Session], list[dict[str, Any]]],
    kind: str,
    **detail: Any,
) -> int:
    """Rows fetched in one transaction with the audit event of the look (``kind``: an
    ``storage.audit`` event name), then printed."""
    from medreid.app import build_database
    from storage import audit

    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            rows = fetch(session)
            _audit_listing(session, getattr(audit, kind), args, rows=len(rows), **detail)
    finally:
        engine.dispose()
    print(render(rows, args.format, columns))
    return 0


def _times(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    return {
        "since": _when(args.since, "--since", clock()),
        "until": _when(args.until, "--until", clock()),
    }


def cmd_audit(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from storage import audit
    from storage.audit_trail import AuditFilter, query_audit

    where = AuditFilter(
        **_times(args, clock),
        event=args.event,
        ae=args.ae,
        host=args.host,
        patient=args.patient,
        study=args.study,
        outcome=audit.OUTCOME_NAMES[args.outcome] if args.outcome else None,
        user=args.user,
        limit=args.limit,
    )
    filters = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("config", "command")
    }
    return _listing(
        settings,
        args,
        AUDIT_COLUMNS,
        lambda session: [
            {c: getattr(e, c) for c in AUDIT_COLUMNS} for e in query_audit(session, where=where)
        ],
        "AUDIT_LOG_USED",
        filters=filters,
    )


def cmd_instances(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from storage.instances import InstanceFilter, list_instances

    where = InstanceFilter(
        **_times(args, clock),
        state=args.state,
        ae=args.ae,
        patient=args.patient,
        study=args.study,
        limit=args.limit,
    )

    def fetch(session: Session) -> list[dict[str, Any]]:
        return [
            {
                **{c: getattr(instance, c) for c in INSTANCE_FIELDS},
                **{c: getattr(result, c) if result else None for c in INSTANCE_RESULT_FIELDS},
            }
            for instance, result in list_instances(session, where=where)
        ]

    return _listing(settings, args, INSTANCE_COLUMNS, fetch, "QUERY", listing="instances")


def cmd_results(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from storage.results import ResultQuery, SeriesQuery, page_results, page_series

    since = _when(args.since, "--since", clock())
    filters = {
        "verdict": args.verdict,
        "study": args.study,
        "patient": args.patient,
        "limit": args.limit,
    }
    if args.series:
        series_where = SeriesQuery(decided_from=since, **filters)

        def fetch_series(session: Session) -> list[dict[str, Any]]:
            found, _ = page_series(session, where=series_where)
            return [  # oldest first, as every listing here
                {c.key: getattr(row, c.key) for c in row.__table__.columns}
                for row in reversed(found)
            ]

        return _listing(
            settings,
            args,
            SERIES_COLUMNS,
            fetch_series,
            "QUERY",
            listing="series",
            verdict=args.verdict,
        )
    where = ResultQuery(received_from=since, **filters)

    def fetch(session: Session) -> list[dict[str, Any]]:
        found, _ = page_results(session, where=where)
        rows = []
        for result, instance in reversed(found):  # oldest first, as every listing here
            matches = result.top_matches or []
            rows.append(
                {
                    "id": result.id,
                    "created_at": result.created_at,
                    **{c: getattr(instance, c) for c in RESULT_INSTANCE_FIELDS},
                    **{c: getattr(result, c) for c in RESULT_FIELDS},
                    "best_score": matches[0]["score"] if matches else None,
                    "top_matches": matches,
                    "identity_threshold": result.identity_threshold,
                    "header_score": result.identity_header_score,
                    "model_versions": result.model_versions,
                    "timings_ms": result.timings_ms,
                }
            )
        return rows

    return _listing(
        settings, args, RESULT_COLUMNS, fetch, "QUERY", listing="results", verdict=args.verdict
    )


COMMANDS = {"audit": cmd_audit, "instances": cmd_instances, "results": cmd_results}
