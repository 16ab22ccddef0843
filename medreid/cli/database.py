"""`medreid db`: the schema (Alembic)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Clock
log = logging.getLogger("medreid")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the newest schema")
    upgrade.add_argument("--revision", default="head")
    db_commands.add_parser("current", help="show the schema revision of the database")


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


COMMANDS = {"db": cmd_db}
