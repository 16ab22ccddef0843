"""The `medreid` command line. Only this module configures logging handlers."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from medreid import __version__
from medreid.output import FORMATS, parse_when, render
from medreid.settings import Settings, SettingsError, describe, load_settings, mask_secrets

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Clock
    from storage.repository import ResultFilter

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
    audit_parser.add_argument("--user", help="the acting user (console users, OS users)")
    audit_parser.add_argument(
        "--outcome",
        choices=["success", "minor", "serious", "major"],  # storage.audit.OUTCOME_NAMES
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

    train = commands.add_parser("train", help="train COMPA or a re-identification model")
    train_kinds = train.add_subparsers(dest="kind", required=True, metavar="MODEL")
    compa = train_kinds.add_parser("compa", help="the modality model, from modality folders")
    compa.add_argument("datasets", type=Path, nargs="+", help="DATASET/<modality>/<patient>/...")
    compa.add_argument("--out", type=Path, required=True, help="folder for the model folder")
    compa.add_argument("--backbone-weights", default="none", help="PATH, imagenet or none")
    compa.add_argument("--size", type=int, default=128)
    compa.add_argument("--prototypes", type=int, default=4, help="references per modality")
    compa.add_argument("--seed", type=int, default=0)
    compa.add_argument("--version", help="version label (default: the time)")
    reid = train_kinds.add_parser("reid", help="a re-identification model for one modality")
    reid.add_argument("dataset", type=Path, help="DATASET/<modality> (patient folders)")
    reid.add_argument("--modality", required=True)
    reid.add_argument("--out", type=Path, required=True, help="folder for the model folder")
    reid.add_argument(
        "--backbone",
        default="mobilenet_v2",
        choices=["mobilenet_v2", "mobilenet_v1", "mobilenet_v3_small"],
    )
    reid.add_argument(
        "--recipe",
        choices=["finetune", "frozen"],
        default="finetune",
        help="finetune: train the whole network (default); frozen: keep the ImageNet backbone "
        "and fit a linear projection on the training patients (for a few dozen patients)",
    )
    reid.add_argument("--alpha", type=float, default=1.0)
    reid.add_argument("--size", type=int, help="input px (default: 128; 256 for --recipe frozen)")
    reid.add_argument("--backbone-weights", default="none", help="PATH, imagenet or none")
    reid.add_argument("--epochs", type=int, default=12)
    reid.add_argument("--batch-size", type=int, default=32)
    reid.add_argument("--learning-rate", type=float, default=5e-4)
    reid.add_argument("--rotation", type=float, default=15.0)
    reid.add_argument("--zoom", type=float, default=0.1)
    reid.add_argument("--flip", choices=["yes", "no"], help="default: only for dermoscopy")
    reid.add_argument("--brightness", default="0.8,1.2", help="LOW,HIGH or none")
    reid.add_argument("--false-match-rate", type=float, default=0.01)
    reid.add_argument("--seed", type=int, default=0)
    reid.add_argument("--version", help="version label (default: the time)")
    whitening = train_kinds.add_parser(
        "whitening",
        help="a trained re-identification model followed by a whitening fitted on other patients",
    )
    whitening.add_argument(
        "dataset", type=Path, help="DATASET/<modality> of patients the model never saw"
    )
    whitening.add_argument(
        "--model", type=Path, required=True, help="the model folder to start from"
    )
    whitening.add_argument("--out", type=Path, required=True, help="folder for the model folder")
    whitening.add_argument("--version", help="version label (default: the time)")

    evaluate = commands.add_parser("evaluate", help="evaluate a model beside baselines")
    evaluate_kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="MODEL")
    for kind in ("compa", "reid"):
        parser_kind = evaluate_kinds.add_parser(kind, help=f"evaluate a {kind} model")
        parser_kind.add_argument("--model", type=Path, required=True, help="model folder")
        parser_kind.add_argument("dataset", type=Path)
        parser_kind.add_argument("--json", action="store_true", help="print JSON")
        parser_kind.add_argument("--plots", type=Path, help="folder for PNG plots")
        if kind == "reid":
            parser_kind.add_argument(
                "--imagenet-weights", help="weights for the ImageNet-feature baseline"
            )
            parser_kind.add_argument(
                "--max-per-patient",
                type=int,
                help="cap images per patient (so few patients can't dominate)",
            )

    models = commands.add_parser("models", help="installed models")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_commands.add_parser("list", help="list model folders")
    listing.add_argument("--dir", type=Path, help="default: models.dir of the configuration")
    listing.add_argument("--format", choices=FORMATS, default="table")
    activate = models_commands.add_parser(
        "activate", help="serve this model version from now on (workers switch without restart)"
    )
    activate.add_argument("name", help="model folder name, e.g. reid-xray-v2, or a path")
    activate.add_argument("--dir", type=Path, help="default: models.dir of the configuration")

    enroll = commands.add_parser("enroll", help="enroll images in the re-identification gallery")
    enroll.add_argument(
        "dataset",
        type=Path,
        nargs="?",
        help="DATASET/<modality>/<patient_id>/... (the folder is the identity)",
    )
    enroll.add_argument(
        "--files", help="with DATASET: only file names matching this glob, e.g. 'v1_*'"
    )
    enroll.add_argument("--study", help="enroll received instances of this study")
    enroll.add_argument("--patient", help="enroll received instances of this header patient ID")
    enroll.add_argument(
        "--again-from",
        metavar="MODEL",
        help="enroll the gallery of an earlier model version (e.g. reid-xray-v1) again under "
        "the model now serving, from the images it was enrolled from",
    )
    enroll.add_argument(
        "--into",
        metavar="NAME",
        help="with --again-from: enroll into this model folder (name or path) before it serves",
    )

    demo = commands.add_parser(
        "demo",
        help="generate a hospital, enroll its first visits, send the second ones, show the catch",
    )
    demo.add_argument("--out", type=Path, default=Path("var/demo"), help="the demo hospital")
    demo.add_argument("--patients", type=int, default=12)
    demo.add_argument("--seed", type=int, default=2026)

    users = commands.add_parser("users", help="the web console's users and API tokens")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    for action, text in (
        ("add", "add a user (asks for the password twice)"),
        ("password", "set a new password; ends the user's sessions and tokens"),
    ):
        sub = user_commands.add_parser(action, help=text)
        sub.add_argument("name")
        sub.add_argument(
            "--password-stdin", action="store_true", help="read the password from standard input"
        )
    user_commands.add_parser("list", help="list users").add_argument(
        "--format", choices=FORMATS, default="table"
    )
    user_commands.add_parser(
        "disable", help="disable a user and end its sessions and tokens"
    ).add_argument("name")
    user_commands.add_parser(
        "unlock", help="end a login lockout of a user name: earlier failures no longer count"
    ).add_argument("name")
    token = user_commands.add_parser(
        "token", help="make an API bearer token for a user (printed once, stored hashed)"
    )
    token.add_argument("name")
    token.add_argument("--days", type=int, help="lifetime (default: console.api_token_days)")

    results = commands.add_parser("results", help="list pipeline results and verdicts")
    results.add_argument("--verdict", help="e.g. mismatch, consistent, new_patient, agree")
    results.add_argument("--study", help="Study Instance UID")
    results.add_argument("--patient", help="header or matched patient ID")
    results.add_argument("--since", help="ISO date/time, or relative: 30m, 12h, 7d")
    results.add_argument("--limit", type=int, default=1000)
    results.add_argument("--format", choices=FORMATS, default="table")
    results.add_argument(
        "--series",
        action="store_true",
        help="list the series verdicts (CT and MR series, once complete) instead of images",
    )

    baseline = commands.add_parser(
        "baseline", help="raw-pixel cosine re-identification baseline of a dataset"
    )
    baseline.add_argument("dataset", type=Path, help="DATASET/<modality>/<patient_id>/...")
    baseline.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
    baseline.add_argument("--format", choices=FORMATS, default="table")
    return parser


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
    from storage.repository import append_audit

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


def cmd_db(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
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


def cmd_audit(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database
    from storage import audit
    from storage.repository import AuditFilter, query_audit

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
    from storage.repository import InstanceFilter, list_instances

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


def cmd_serve(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import NotReadyError, serve

    config = str(args.config) if args.config else os.environ.get("MEDREID_CONFIG")
    try:
        return serve(settings, config)
    except NotReadyError as exc:
        log.error("%s", exc)
        print(f"medreid: {exc}", file=sys.stderr)
        return 5


def cmd_worker(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    import signal
    import threading

    from medreid.app import run_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    name = args.name or f"{os.uname().nodename}:worker/{os.getpid()}/0"
    run_worker(settings, name=name, should_stop=stop.is_set)
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.demo import run_demo

    config = str(args.config) if args.config else os.environ.get("MEDREID_CONFIG")
    return run_demo(settings, config, args.out, patients=args.patients, seed=args.seed)


def cmd_config(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    for key, value in describe(settings):
        print(f"{key} = {value}")
    return 0


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


def cmd_synth(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    import time

    from synthetic.hospital import SynthOptions, generate, preview

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


def cmd_augment(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
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


def cmd_baseline(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
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


def _brightness(text: str | None) -> tuple[float, float] | None:
    if not text or text == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit("medreid: --brightness takes LOW,HIGH, e.g. 0.8,1.2") from None
    return (low, high)


class _TrainProgress(_Bar):
    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc="training", unit="batch", disable=None)

    def __call__(self, phase: str, done: int, total: int, record: dict[str, float]) -> None:
        if phase == "train":
            self.bar.total = total
            self.bar.n = done
            self.bar.set_postfix(epoch=int(record["epoch"]), loss=f"{record['loss']:.3f}")
        elif phase == "features":
            self.bar.unit = "image"
            self.bar.set_description("features")
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        elif phase == "fit":
            self.bar.write(
                f"projection: {int(record['dims'])} dimensions, shrinkage {record['shrinkage']} "
                f"(cross-validated mAP@R {record['cv_map_at_r']:.3f})"
            )
        else:
            shown = {k: round(v, 4) for k, v in record.items()}
            self.bar.write(f"epoch {done}/{total}: {shown}")


def cmd_train(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from pipeline.models.backbone import BackboneError

    try:
        if args.kind == "compa":
            from pipeline.models.compa import CompaConfig, train_compa

            with _Progress("features") as progress:
                trained = train_compa(
                    CompaConfig(args.backbone_weights, args.size, args.prototypes, seed=args.seed),
                    args.datasets,
                    args.out,
                    version=args.version,
                    pipeline=_pipeline_config(settings),
                    progress=lambda _phase, done, total: progress(done, total),
                )
            print(
                f"COMPA: validation accuracy {trained.description['metrics']['accuracy']:.4f}"
                f"; model in {trained.folder}"
            )
            return 0
        if args.kind == "whitening":
            from pipeline.models.reid import whiten_reid

            with _TrainProgress() as whitening_progress:
                result = whiten_reid(
                    args.model,
                    args.dataset,
                    args.out,
                    version=args.version,
                    pipeline=_pipeline_config(settings),
                    progress=whitening_progress,
                )
            metrics = result.description["metrics"]
            print(
                f"{result.description['modality']}: out-of-fold P@1 {metrics['p_at_1']:.3f}, "
                f"mAP@R {metrics['map_at_r']:.3f}, ROC AUC {metrics['roc_auc']:.4f}; threshold "
                f"{result.description['threshold']:.4f}; model in {result.folder}"
            )
            return 0
        from pipeline.models.reid import ReidConfig, train_reid

        config = ReidConfig(
            modality=args.modality,
            backbone=args.backbone,
            alpha=args.alpha,
            size=args.size or (256 if args.recipe == "frozen" else 128),
            backbone_weights=args.backbone_weights,
            recipe=args.recipe,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            false_match_rate=args.false_match_rate,
            rotation_deg=args.rotation,
            zoom=args.zoom,
            horizontal_flip=None if args.flip is None else args.flip == "yes",
            brightness=_brightness(args.brightness),
            seed=args.seed,
        )
        with _TrainProgress() as train_progress:
            result = train_reid(
                config,
                args.dataset,
                args.out,
                version=args.version,
                pipeline=_pipeline_config(settings),
                progress=train_progress,
            )
    except (BackboneError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"medreid train: {exc}") from None
    metrics = result.description["metrics"]
    print(
        f"{args.modality}: validation P@1 {metrics['p_at_1']:.3f}, mAP@R "
        f"{metrics['map_at_r']:.3f}, ROC AUC {metrics['roc_auc']:.4f}; threshold "
        f"{result.description['threshold']:.4f}; {result.description['training_seconds']} s; "
        f"model in {result.folder}"
    )
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    import json

    from pipeline.models import evaluate

    try:
        if args.kind == "compa":
            report = evaluate.evaluate_compa(
                args.model, args.dataset, pipeline=_pipeline_config(settings)
            )
            if args.plots:
                evaluate.plot_confusion(report, args.plots)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print(f"accuracy {report['accuracy']:.4f} on {report['n_images']} images")
                rows = [
                    {
                        "true": label,
                        **dict(zip(report["labels"], counts, strict=True)),
                        "recall": report["per_class_recall"].get(label),
                    }
                    for label, counts in zip(
                        report["labels"], report["confusion_matrix"], strict=True
                    )
                ]
                print(render(rows, "table", ["true", *report["labels"], "recall"]))
            return 0
        evaluation = evaluate.evaluate_reid(
            args.model,
            args.dataset,
            pipeline=_pipeline_config(settings),
            imagenet_weights=args.imagenet_weights,
            max_per_patient=args.max_per_patient,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"medreid evaluate: {exc}") from None
    report = evaluation.report
    if args.plots:
        evaluate.plot_reid(evaluation, args.plots)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    keys = ["p_at_1", "map_at_r", "roc_auc", "eer"]
    rows = [{"method": "model", **{k: report[k] for k in keys}}]
    for name, scores in report["baselines"].items():
        if isinstance(scores, dict):
            rows.append({"method": name, **{k: scores[k] for k in keys}})
    print(f"{report['model']} on {report['n_patients']} patients, {report['n_images']} images")
    print(render(rows, "table", ["method", *keys]))
    return 0


def cmd_models(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from dataclasses import asdict

    from pipeline.models.artifacts import ArtifactError, list_models, read_model

    root = args.dir or settings.models.dir
    if args.models_command == "activate":
        from medreid.app import build_database, os_user
        from pipeline.modelstore import slot_of
        from storage import audit
        from storage.repository import activate_model, append_audit

        folder = Path(args.name) if Path(args.name).is_dir() else root / args.name
        try:
            description = read_model(folder)
        except ArtifactError as exc:
            raise SystemExit(f"medreid models activate: {exc}") from None
        slot = slot_of(description)
        engine, sessions = build_database(settings)
        try:
            with sessions.begin() as session:
                activate_model(
                    session,
                    slot=slot,
                    version=folder.name,
                    path=str(folder.resolve()),
                    by=os_user(),
                )
                append_audit(
                    session,
                    record=audit.AuditRecord(
                        kind=audit.MODEL_ACTIVATED,
                        actor_user=os_user(),
                        detail={"slot": slot, "model": folder.name},
                    ),
                )
        finally:
            engine.dispose()
        print(f"{slot}: {folder.name} is active; workers switch at their next batch")
        return 0
    rows = [
        {k: str(v) if isinstance(v, Path) else v for k, v in asdict(m).items()}
        for m in list_models(root)
    ]
    print(
        render(
            rows,
            args.format,
            ["name", "kind", "modality", "version", "size_mb", "headline"],
            max_width=60,
        )
    )
    return 0


def cmd_enroll(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.app import build_database, os_user
    from medreid.enrollment import enroll_again, enroll_folder, enroll_received

    sources = [args.dataset is not None, bool(args.study or args.patient), bool(args.again_from)]
    if args.into and not args.again_from:
        raise SystemExit("medreid enroll: --into goes with --again-from")
    if sum(sources) != 1:
        raise SystemExit(
            "medreid enroll: give one of a DATASET folder, --study / --patient, or --again-from"
        )
    engine, sessions = build_database(settings)
    progress = _Progress("enroll")
    gone = 0
    try:
        if args.again_from:
            into = None
            if args.into:
                into = Path(args.into)
                into = into if into.is_dir() else settings.models.dir / args.into
            counts, gone = enroll_again(
                settings,
                sessions,
                os_user(),
                from_model=args.again_from,
                into=into,
                progress=progress,
            )
        elif args.dataset is not None:
            counts = enroll_folder(
                settings, sessions, args.dataset, os_user(), progress, files=args.files
            )
        else:
            counts = enroll_received(
                settings, sessions, os_user(), study=args.study, patient=args.patient
            )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"medreid enroll: {exc}") from None
    finally:
        progress.close()
        engine.dispose()
    for model, count in counts.items():
        print(f"{model}: {count} embeddings enrolled")
    if gone:
        print(f"{gone} entries of {args.again_from} not enrolled again: their image is gone")
    if not counts:
        print("nothing enrolled: no images, or no re-identification model for their modality")
    return 0


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


def _series_listing(settings: Settings, args: argparse.Namespace, where: ResultFilter) -> int:
    from medreid.app import build_database
    from storage import audit
    from storage.repository import list_series_verdicts

    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            rows = [
                {c.key: getattr(row, c.key) for c in row.__table__.columns}
                for row in list_series_verdicts(session, where=where)
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
    from storage.repository import ResultFilter, list_results

    where = ResultFilter(
        since=_when(args.since, "--since", clock()),
        verdict=args.verdict,
        study=args.study,
        patient=args.patient,
        limit=args.limit,
    )
    if args.series:
        return _series_listing(settings, args, where)
    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            rows = []
            for result, instance in list_results(session, where=where):
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


def _read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("medreid: the passwords differ")
    return first


def cmd_users(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from sqlalchemy.exc import IntegrityError

    from console.passwords import (
        WeakPasswordError,
        check_password_policy,
        hash_password,
        new_token,
        token_digest,
    )
    from medreid.app import build_database, os_user
    from storage import audit
    from storage.accounts import add_user, disable_user, find_user, list_users, open_session
    from storage.accounts import set_password as store_password
    from storage.models import SessionKind
    from storage.repository import append_audit

    name: str = getattr(args, "name", "")
    valid_name = 1 <= len(name) <= 64 and name.isprintable() and bool(name.strip())
    if args.users_command != "list" and not valid_name:
        raise SystemExit("medreid: a user name has 1 to 64 printable characters")
    password_hash = None
    if args.users_command in ("add", "password"):
        password = _read_password(args)
        try:
            check_password_policy(password, name)
        except WeakPasswordError as exc:
            raise SystemExit(f"medreid: {exc}") from None
        password_hash = hash_password(password)

    def changed(session: Any, change: str, **detail: Any) -> None:
        append_audit(
            session,
            record=audit.AuditRecord(
                kind=audit.USER_CHANGED,
                actor_user=os_user(),
                actor_host=os.uname().nodename,
                detail={"interface": "cli", "user": name, "change": change, **detail},
                occurred_at=clock(),
            ),
        )

    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            if args.users_command == "list":
                rows = [
                    {
                        "username": u.username,
                        "created_at": u.created_at,
                        "created_by": u.created_by,
                        "last_login_at": u.last_login_at,
                        "disabled_at": u.disabled_at,
                    }
                    for u in list_users(session)
                ]
                print(render(rows, args.format, list(rows[0]) if rows else ["username"]))
                return 0
            if args.users_command == "add":
                assert password_hash is not None
                try:
                    with session.begin_nested():
                        add_user(session, username=name, password_hash=password_hash, by=os_user())
                except IntegrityError:
                    raise SystemExit(f"medreid: user {name!r} exists") from None
                changed(session, "added")
                print(f"user {name} added")
                return 0
            user = find_user(session, username=name)
            if user is None:
                raise SystemExit(f"medreid: no user {name!r}")
            now = clock()
            if args.users_command == "password":
                assert password_hash is not None
                store_password(session, user=user, password_hash=password_hash, now=now)
                changed(session, "password")
                print(f"password of {name} changed; its sessions and tokens are ended")
            elif args.users_command == "disable":
                disable_user(session, user=user, now=now)
                changed(session, "disabled")
                print(f"user {name} disabled; its sessions and tokens are ended")
            elif args.users_command == "unlock":
                user.unlocked_at = now
                changed(session, "unlocked")
                print(f"user {name} unlocked; its earlier failed logins no longer count")
            else:
                if user.disabled_at is not None:
                    raise SystemExit(f"medreid: user {name!r} is disabled")
                days = args.days if args.days is not None else settings.console.api_token_days
                if not 1 <= days <= 3650:
                    raise SystemExit("medreid: --days: from 1 to 3650")
                token = new_token()
                expires = now + dt.timedelta(days=days)
                open_session(
                    session,
                    user=user,
                    kind=SessionKind.API,
                    token_sha256=token_digest(token),
                    csrf_token=None,
                    client_host=None,
                    now=now,
                    expires_at=expires,
                )
                changed(session, "api token", expires_at=expires.isoformat())
                print(token)
                print(
                    f"API token of {name}, valid until {expires:%Y-%m-%d %H:%M} UTC; it is shown "
                    "once. Send it as 'Authorization: Bearer TOKEN'.",
                    file=sys.stderr,
                )
    finally:
        engine.dispose()
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
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "models": cmd_models,
    "enroll": cmd_enroll,
    "results": cmd_results,
    "demo": cmd_demo,
    "users": cmd_users,
}


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Runs one command; `clock` (the system's, by default) is the one source of "now" for
    what the command decides."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"medreid: invalid configuration: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2
    from medreid.logs import configure_logging

    configure_logging(settings)
    # what the commands create (the SQLite database and its journals, the spool, exports) is
    # the service user's alone, or its group's too where configured
    os.umask(0o027 if settings.spool.group_readable else 0o077)
    from sqlalchemy.exc import OperationalError

    from storage.db import SchemaNotCurrentError
    from storage.models import utcnow

    try:
        return COMMANDS[args.command](settings, args, clock or utcnow)
    except SchemaNotCurrentError as exc:
        print(f"medreid: {exc}", file=sys.stderr)
        return 3
    except OperationalError as exc:
        print(f"medreid: database unavailable: {mask_secrets(str(exc.orig))}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(main())
