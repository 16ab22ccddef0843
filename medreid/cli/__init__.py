"""The `medreid` command line: one module per command group, each with its parsers and its
commands. Only the command line configures logging handlers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medreid import __version__
from medreid.cli import alerts, data, database, models, priors, records, service, users
from medreid.settings import SettingsError, load_settings, mask_secrets

if TYPE_CHECKING:
    from storage.models import Clock

GROUP_MODULES = (service, database, records, alerts, data, models, priors, users)
COMMANDS = {name: run for group in GROUP_MODULES for name, run in group.COMMANDS.items()}


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
        help="configuration file (default: $MEDREID_CONFIG or the packaged medreid.toml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUP_MODULES:
        group.add_parsers(commands)
    return parser


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
