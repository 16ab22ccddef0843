"""`medreid priors backfill|status`: the patients' PACS priors, filled ahead of time."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medreid.cli.common import _Progress
from medreid.settings import KNOWN_MODALITIES, Settings

if TYPE_CHECKING:
    from storage.models import Clock


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    priors = commands.add_parser("priors", help="the patients' earlier images in the PACS")
    actions = priors.add_subparsers(dest="action", required=True, metavar="ACTION")
    fill = actions.add_parser(
        "backfill",
        help="fill the gallery from the PACS ahead of time (resumable: what is held is "
        "not fetched again)",
    )
    fill.add_argument("--since", type=_date, required=True, help="studies from this date")
    fill.add_argument("--until", type=_date, help="studies up to this date (default: today)")
    fill.add_argument(
        "--modality", choices=KNOWN_MODALITIES, help="one modality (default: all served)"
    )
    fill.add_argument(
        "--patients",
        type=Path,
        help="a file of PatientIDs, one a line (default: every patient with a study in the "
        "window, as the PACS answers)",
    )


def cmd_priors(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.builders import build_database, build_priors
    from medreid.priors import backfill, backfill_patients
    from medreid.processes import build_analyser
    from pipeline.modelstore import discover

    if not settings.priors.enabled:
        raise SystemExit("medreid priors: no PACS node is configured (priors.nodes)")
    until = args.until or clock().date()
    if args.since > until:
        raise SystemExit("medreid priors backfill: --since is after --until")
    engine, sessions = build_database(settings)
    try:
        analyser = build_analyser(settings, sessions)
        if analyser is None:
            raise SystemExit(f"medreid priors: no models under {settings.models.dir}")
        # The PACS is asked first and the models (seconds to load) only where it names
        # someone: a window with no study answers at once.
        installed = sorted(
            slot.split(":", 1)[1]
            for slot in discover(settings.models.dir)
            if slot.startswith("reid:")
        )
        modalities = [args.modality] if args.modality else installed
        if not set(modalities) & set(installed):
            raise SystemExit("medreid priors: no re-identification model serves that modality")
        fetcher = build_priors(settings, sessions, analyser, "cli:priors-backfill")
        assert fetcher is not None
        if args.patients is not None:
            try:
                lines = args.patients.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise SystemExit(f"medreid priors: {args.patients}: {exc.strerror}") from None
            patients = sorted({line.strip() for line in lines if line.strip()})
        else:
            patients = sorted(
                backfill_patients(fetcher, since=args.since, until=until, modalities=modalities)
            )
        if patients:
            analyser.refresh()
            modalities = [m for m in modalities if analyser.embedder(m) is not None]
            if not modalities:
                raise SystemExit(
                    "medreid priors: no re-identification model judges that modality (none "
                    "serves it, or analysis.identity_modalities leaves it out)"
                )
        with _Progress("priors") as progress:
            progress.bar.unit = "patient-modality"
            report = backfill(
                fetcher,
                patients=patients,
                modalities=modalities,
                since=args.since,
                until=until,
                progress=progress,
            )
        print(
            json.dumps(
                {
                    "patients": report.patients,
                    "modalities": modalities,
                    "entries_added": report.images,
                    "unavailable": report.unavailable,
                },
                indent=2,
            )
        )
        if report.unavailable:
            print(
                f"medreid priors backfill: {len(report.unavailable)} not to be had; run it "
                "again to resume",
                file=sys.stderr,
            )
            return 1
        return 0
    finally:
        engine.dispose()


COMMANDS = {"priors": cmd_priors}
