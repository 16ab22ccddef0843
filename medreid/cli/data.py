"""`medreid synth`, `augment` and `baseline`: datasets for training and evaluation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medreid.cli.common import _pipeline_config, _Progress
from medreid.output import FORMATS, render
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Clock
log = logging.getLogger("medreid")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def cmd_synth(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    import time

    from synthetic.hospital import SynthOptions, generate
    from synthetic.preview import preview

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
    from training.datasets.augment import AugmentParams, export_augmented

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

    from training.baseline import raw_pixel_baseline

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


COMMANDS = {"synth": cmd_synth, "augment": cmd_augment, "baseline": cmd_baseline}
