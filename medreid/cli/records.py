"""`medreid audit`, `instances` and `results`: what was received, found and done (each look
audited)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from medreid.cli.common import _add_listing_filters, _audit_listing, _when
from medreid.output import FORMATS, render
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
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


def cmd_audit(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database
    from storage import audit
    from storage.audit_trail import AuditFilter, query_audit

    where = AuditFilter(
        since=_when(args.since, "--since", clock()),
        until=_when(args.until, "--until", clock()),
        event=args.event,
        ae=args.ae,
        host=args.host,
        patient=args.patient,
        study=args.study,
        outcome=audit.OUTCOME_NAMES[args.outcome] if args.outcome else None,
        user=args.user,
        limit=args.limit,
    )
    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            events = query_audit(session, where=where)
            rows = [{c: getattr(e, c) for c in AUDIT_COLUMNS} for e in events]
            filters = {
                k: v
                for k, v in vars(args).items()
                if v is not None and k not in ("config", "command")
            }
            _audit_listing(session, audit.AUDIT_LOG_USED, args, filters=filters, rows=len(rows))
    finally:
        engine.dispose()
    print(render(rows, args.format, AUDIT_COLUMNS))
    return 0


def cmd_instances(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database
    from storage import audit
    from storage.instances import InstanceFilter, list_instances

    where = InstanceFilter(
        since=_when(args.since, "--since", clock()),
        until=_when(args.until, "--until", clock()),
        state=args.state,
        ae=args.ae,
        patient=args.patient,
        study=args.study,
        limit=args.limit,
    )
    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            rows: list[dict[str, Any]] = []
            for instance, result in list_instances(session, where=where):
                rows.append(
                    {
                        "id": instance.id,
                        "received_at": instance.received_at,
                        "calling_ae": instance.calling_ae,
                        "peer_host": instance.peer_host,
                        "patient_id": instance.patient_id,
                        "study_instance_uid": instance.study_instance_uid,
                        "series_instance_uid": instance.series_instance_uid,
                        "sop_instance_uid": instance.sop_instance_uid,
                        "sop_class_uid": instance.sop_class_uid,
                        "version": instance.version,
                        "modality": instance.modality,
                        "transfer_syntax_uid": instance.transfer_syntax_uid,
                        "size_bytes": instance.size_bytes,
                        "sha256": instance.sha256,
                        "state": instance.state,
                        "shape": result.shape if result else None,
                        "frames_analysed": result.frames_analysed if result else None,
                        "failed_stage": result.failed_stage if result else None,
                        "failure_reason": result.failure_reason if result else None,
                        "timings_ms": result.timings_ms if result else None,
                    }
                )
            _audit_listing(session, audit.QUERY, args, listing="instances", rows=len(rows))
    finally:
        engine.dispose()
    print(render(rows, args.format, INSTANCE_COLUMNS))
    return 0


def _series_listing(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database
    from storage import audit
    from storage.results import SeriesQuery, page_series

    where = SeriesQuery(
        decided_from=_when(args.since, "--since", clock()),
        verdict=args.verdict,
        study=args.study,
        patient=args.patient,
        limit=args.limit,
    )
    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            found, _ = page_series(session, where=where)
            rows = [
                {c.key: getattr(row, c.key) for c in row.__table__.columns}
                for row in reversed(found)  # oldest first, as every listing here
            ]
            _audit_listing(
                session, audit.QUERY, args, listing="series", rows=len(rows), verdict=args.verdict
            )
    finally:
        engine.dispose()
    print(render(rows, args.format, SERIES_COLUMNS))
    return 0


def cmd_results(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database
    from storage import audit
    from storage.results import ResultQuery, page_results

    if args.series:
        return _series_listing(settings, args, clock)
    where = ResultQuery(
        received_from=_when(args.since, "--since", clock()),
        verdict=args.verdict,
        study=args.study,
        patient=args.patient,
        limit=args.limit,
    )
    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            rows = []
            found, _ = page_results(session, where=where)
            for result, instance in reversed(found):  # oldest first, as every listing here
                matches = result.top_matches or []
                rows.append(
                    {
                        "id": result.id,
                        "created_at": result.created_at,
                        "calling_ae": instance.calling_ae,
                        "patient_id": instance.patient_id,
                        "modality": instance.modality,
                        "study_instance_uid": instance.study_instance_uid,
                        "sop_instance_uid": instance.sop_instance_uid,
                        "status": result.status,
                        "failure_reason": result.failure_reason,
                        "predicted_modality": result.predicted_modality,
                        "modality_scores": result.modality_scores,
                        "modality_verdict": result.modality_verdict,
                        "identity_verdict": result.identity_verdict,
                        "matched_patient_id": result.matched_patient_id,
                        "best_score": matches[0]["score"] if matches else None,
                        "top_matches": matches,
                        "identity_threshold": result.identity_threshold,
                        "header_score": result.identity_header_score,
                        "model_versions": result.model_versions,
                        "timings_ms": result.timings_ms,
                    }
                )
            _audit_listing(
                session, audit.QUERY, args, listing="results", rows=len(rows), verdict=args.verdict
            )
    finally:
        engine.dispose()
    print(render(rows, args.format, RESULT_COLUMNS))
    return 0


COMMANDS = {"audit": cmd_audit, "instances": cmd_instances, "results": cmd_results}
