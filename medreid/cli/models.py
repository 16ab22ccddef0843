"""`medreid train`, `evaluate`, `models` and `enroll`: the models and their gallery."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medreid.cli.common import _Bar, _brightness, _pipeline_config, _Progress
from medreid.output import FORMATS, render
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Clock
log = logging.getLogger("medreid")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    reid.add_argument(
        "--feature-layers",
        default="",
        help="frozen recipe: comma-separated inner backbone layers whose maps are pooled on "
        "--grid (default: the backbone's global pool)",
    )
    reid.add_argument("--grid", type=int, default=1, help="cells per side for --feature-layers")
    reid.add_argument(
        "--flips",
        default="",
        help="frozen recipe: average the features over the image and these flips of it, "
        "comma-separated from horizontal, vertical (each costs one more backbone pass; for "
        "pictures with no left and right, such as dermoscopy)",
    )
    reid.add_argument(
        "--fit-flips",
        default="",
        help="frozen recipe: fit the projection on these flips of the training images too, "
        "as the same patients (horizontal, vertical; costs training time only)",
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
        "--model",
        type=Path,
        required=True,
        help="the fine-tuned model folder to start from (a whitening it ends in is replaced)",
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
            from training.compa import CompaConfig, train_compa

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
            from training.reid import whiten_reid

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
        from training.reid import ReidConfig, train_reid

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
            feature_layers=tuple(n for n in args.feature_layers.split(",") if n),
            grid=args.grid,
            flips=tuple(n for n in args.flips.split(",") if n),
            fit_flips=tuple(n for n in args.fit_flips.split(",") if n),
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

    from training import evaluate

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
        if args.plots:
            evaluate.plot_reid(evaluation, args.plots)
    except (FileNotFoundError, ValueError, evaluate.PlotsUnavailable) as exc:
        raise SystemExit(f"medreid evaluate: {exc}") from None
    report = evaluation.report
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
        from storage.audit_trail import append_audit
        from storage.gallery import activate_model

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
            ["name", "kind", "modality", "version", "trained_on", "size_mb", "headline"],
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


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "models": cmd_models,
    "enroll": cmd_enroll,
}
