"""The `medreid` command line. Only this module configures logging handlers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medreid import __version__
from medreid.output import FORMATS, parse_when, render
from medreid.settings import Settings, SettingsError, describe, load_settings

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


def _add_listing_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO date/time, or relative: 30m, 12h, 7d")
    parser.add_argument("--until", help="ISO date/time, or relative: 30m, 12h, 7d")
    parser.add_argument("--patient", help="patient ID")
    parser.add_argument("--study", help="Study Instance UID")
    parser.add_argument("--ae", help="calling AE title of the sender")
    parser.add_argument("--limit", type=int, default=1000, help="newest N rows (default 1000)")
    parser.add_argument("--format", choices=FORMATS, default="table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medreid",
        description="DICOM receiver that checks each image's modality and patient "
        "against its header.",
    )
    parser.add_argument("--version", action="version", version=f"medreid {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        help="configuration file (default: $MEDREID_CONFIG or config/medreid.toml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="run the DICOM service (SCP and workers)")

    worker = commands.add_parser(
        "worker", help="run one pipeline worker against the shared database (scale-out)"
    )
    worker.add_argument("--name", help="worker name in job claims (default: host/pid)")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the newest schema")
    upgrade.add_argument("--revision", default="head")
    db_commands.add_parser("current", help="show the schema revision of the database")

    audit_parser = commands.add_parser("audit", help="query the audit trail (itself audited)")
    _add_listing_filters(audit_parser)
    audit_parser.add_argument("--event", help="event or event type, e.g. 'Security Alert'")
    audit_parser.add_argument("--host", help="peer host")
    audit_parser.add_argument(
        "--outcome",
        choices=["success", "minor", "serious", "major"],
        help="event outcome",
    )

    instances = commands.add_parser("instances", help="list received instances and results")
    _add_listing_filters(instances)
    instances.add_argument("--state", choices=["queued", "processed", "failed"])

    commands.add_parser("config", help="print the effective configuration")

    synth = commands.add_parser(
        "synth", help="generate a synthetic hospital: DICOM studies and a ground-truth manifest"
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (dataset layout)")
    synth.add_argument("--patients", type=int, default=20)
    synth.add_argument("--visits", type=int, default=3)
    synth.add_argument(
        "--modalities",
        default="xray,ct,mri,dermoscopy",
        help="comma-separated: xray, ct, mri, dermoscopy",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", dest="fmt", choices=["dicom", "png"], default="dicom")
    synth.add_argument("--slices", type=int, default=3, help="CT and MRI slices per visit")
    synth.add_argument(
        "--mislabel-modality",
        type=float,
        default=0.0,
        metavar="RATE",
        help="fraction of series whose Modality tag is wrong",
    )
    synth.add_argument(
        "--swap-patient",
        type=float,
        default=0.0,
        metavar="RATE",
        help="fraction of series filed under another patient's ID",
    )
    synth.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    synth.add_argument(
        "--preview",
        type=Path,
        metavar="PNG",
        help="also draw a patients x visits grid per modality into this PNG",
    )

    augment = commands.add_parser(
        "augment", help="export N augmented, resized images per class folder"
    )
    augment.add_argument("source", type=Path)
    augment.add_argument("destination", type=Path)
    augment.add_argument("--per-class", type=int, default=500)
    augment.add_argument("--size", type=int, default=100)
    augment.add_argument("--rotation", type=float, default=15.0, help="degrees, +/-")
    augment.add_argument("--zoom", type=float, default=0.1)
    augment.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    augment.add_argument("--brightness", help="range, e.g. 0.8,1.2 (default: none)")
    augment.add_argument("--seed", type=int, default=0)

    baseline = commands.add_parser(
        "baseline", help="raw-pixel cosine re-identification baseline of a dataset"
    )
    baseline.add_argument("dataset", type=Path, help="DATASET/<modality>/<patient_id>/...")
    baseline.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
    baseline.add_argument("--format", choices=FORMATS, default="table")
    return parser


def _configure_logging(settings: Settings | None) -> None:
    level = settings.logging.level.upper() if settings else "INFO"
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if level != "DEBUG":
        # Alembic and pynetdicom narrate every step at INFO; keep the service log readable.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _when(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise SystemExit(f"medreid: {option}: {exc}") from None


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from storage.db import current_revision, head_revision, make_engine, upgrade

    url = settings.database.url
    if args.db_command == "upgrade":
        upgrade(url, args.revision)
        print(f"database at revision {args.revision} ({head_revision(url)})")
        return 0
    engine = make_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision(url)
    state = "up to date" if current == head else f"behind: head is {head}"
    print(f"{current or 'empty'} ({state})")
    return 0 if current == head else 1


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from medreid.app import build_database, os_user
    from storage import audit
    from storage.repository import AuditFilter, append_audit, query_audit

    outcomes = {
        "success": audit.Outcome.SUCCESS,
        "minor": audit.Outcome.MINOR_FAILURE,
        "serious": audit.Outcome.SERIOUS_FAILURE,
        "major": audit.Outcome.MAJOR_FAILURE,
    }
    where = AuditFilter(
        since=_when(args.since, "--since"),
        until=_when(args.until, "--until"),
        event=args.event,
        ae=args.ae,
        host=args.host,
        patient=args.patient,
        study=args.study,
        outcome=outcomes[args.outcome] if args.outcome else None,
        limit=args.limit,
    )
    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            events = query_audit(session, where=where)
            rows = [{c: getattr(e, c) for c in AUDIT_COLUMNS} for e in events]
            # Reading the audit log is itself an audit event (Audit Log Used).
            append_audit(
                session,
                record=audit.AuditRecord(
                    kind=audit.AUDIT_LOG_USED,
                    actor_user=os_user(),
                    actor_host=os.uname().nodename,
                    patient_id=args.patient,
                    study_instance_uid=args.study,
                    detail={
                        "interface": "cli",
                        "filters": {
                            k: v
                            for k, v in vars(args).items()
                            if k not in ("config",) and v is not None and k != "command"
                        },
                        "rows": len(rows),
                    },
                ),
            )
    finally:
        engine.dispose()
    print(render(rows, args.format, AUDIT_COLUMNS))
    return 0


def cmd_instances(settings: Settings, args: argparse.Namespace) -> int:
    from medreid.app import build_database, os_user
    from storage import audit
    from storage.repository import InstanceFilter, append_audit, list_instances

    where = InstanceFilter(
        since=_when(args.since, "--since"),
        until=_when(args.until, "--until"),
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
            append_audit(
                session,
                record=audit.AuditRecord(
                    kind=audit.QUERY,
                    actor_user=os_user(),
                    actor_host=os.uname().nodename,
                    patient_id=args.patient,
                    study_instance_uid=args.study,
                    detail={"interface": "cli", "listing": "instances", "rows": len(rows)},
                ),
            )
    finally:
        engine.dispose()
    print(render(rows, args.format, INSTANCE_COLUMNS))
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from medreid.app import serve

    config = str(args.config) if args.config else os.environ.get("MEDREID_CONFIG")
    return serve(settings, config)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    import signal
    import threading

    from medreid.app import run_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    name = args.name or f"{os.uname().nodename}:worker/{os.getpid()}/0"
    run_worker(settings, name=name, should_stop=stop.is_set)
    return 0


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    for key, value in describe(settings):
        print(f"{key} = {value}")
    return 0


class _Progress:
    """A tqdm bar driven by (done, total) callbacks; quiet when stderr is not a terminal."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=description, unit="img", disable=None, leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _pipeline_config(settings: Settings) -> Any:
    from medreid.app import pipeline_config

    return pipeline_config(settings)


def cmd_synth(settings: Settings, args: argparse.Namespace) -> int:
    import time

    from pipeline.datasets.synthetic import SynthOptions, generate, preview

    options = SynthOptions(
        out=args.out,
        patients=args.patients,
        visits=args.visits,
        modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()),
        seed=args.seed,
        fmt=args.fmt,
        slices=args.slices,
        mislabel_modality=args.mislabel_modality,
        swap_patient=args.swap_patient,
        workers=args.workers,
    )
    started = time.monotonic()
    progress = _Progress("series")
    try:
        rows = generate(options, progress)
    except ValueError as exc:
        raise SystemExit(f"medreid synth: {exc}") from None
    finally:
        progress.close()
    swapped = sum(r.swapped for r in rows)
    mislabelled = sum(r.mislabelled for r in rows)
    print(
        f"{len(rows)} files for {options.patients} patients x {options.visits} visits "
        f"({', '.join(options.modalities)}) in {time.monotonic() - started:.1f} s under "
        f"{options.out}; {swapped} filed under another patient, {mislabelled} with a wrong "
        f"Modality tag; ground truth in {options.out / 'manifest.csv'}"
    )
    if args.preview:
        print(f"preview: {preview(options, args.preview)}")
    return 0


def cmd_augment(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.datasets.augment import AugmentParams, export_augmented

    brightness = None
    if args.brightness:
        try:
            low, high = (float(v) for v in args.brightness.split(","))
        except ValueError:
            raise SystemExit("medreid augment: --brightness takes LOW,HIGH, e.g. 0.8,1.2") from None
        brightness = (low, high)
    params = AugmentParams(
        rotation_deg=args.rotation,
        zoom=args.zoom,
        horizontal_flip=not args.no_flip,
        brightness=brightness,
    )
    progress = _Progress("augment")
    try:
        written = export_augmented(
            args.source,
            args.destination,
            per_class=args.per_class,
            size=args.size,
            params=params,
            seed=args.seed,
            config=_pipeline_config(settings),
            progress=progress,
        )
    except FileNotFoundError as exc:
        raise SystemExit(f"medreid augment: {exc}") from None
    finally:
        progress.close()
    print(
        f"{sum(written.values())} images in {len(written)} class folders under {args.destination}"
    )
    return 0


def cmd_baseline(settings: Settings, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.datasets.baseline import raw_pixel_baseline

    progress = _Progress("read")
    try:
        results = raw_pixel_baseline(
            args.dataset, size=args.size, config=_pipeline_config(settings), progress=progress
        )
    except FileNotFoundError as exc:
        raise SystemExit(f"medreid baseline: {exc}") from None
    finally:
        progress.close()
    rows = [
        {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()}
        for r in results
    ]
    columns = (
        "modality",
        "n_patients",
        "n_images",
        "p_at_1",
        "map_at_r",
        "roc_auc",
        "eer",
        "p_at_1_other_visits",
        "unreadable",
    )
    print(render(rows, args.format, columns))
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "worker": cmd_worker,
    "db": cmd_db,
    "audit": cmd_audit,
    "instances": cmd_instances,
    "config": cmd_config,
    "synth": cmd_synth,
    "augment": cmd_augment,
    "baseline": cmd_baseline,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"medreid: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    from sqlalchemy.exc import OperationalError

    from storage.db import SchemaNotCurrentError

    try:
        return COMMANDS[args.command](settings, args)
    except SchemaNotCurrentError as exc:
        print(f"medreid: {exc}", file=sys.stderr)
        return 3
    except OperationalError as exc:
        print(f"medreid: database unavailable: {exc.orig}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(main())
