"""`medreid serve`, `worker`, `demo` and `config`: running the service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medreid.settings import Settings, describe

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Clock
log = logging.getLogger("medreid")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser("serve", help="run the DICOM service (SCP and workers)")
    worker = commands.add_parser(
        "worker", help="run one pipeline worker against the shared database (scale-out)"
    )
    worker.add_argument("--name", help="worker name in job claims (default: host/pid)")
    commands.add_parser("config", help="print the effective configuration")
    demo = commands.add_parser(
        "demo",
        help="generate a hospital, put its first visits in a local Orthanc as the PACS (or "
        "enroll them), send the second ones, show the catch",
    )
    demo.add_argument("--out", type=Path, default=Path("var/demo"), help="the demo hospital")
    demo.add_argument("--patients", type=int, default=12)
    demo.add_argument("--seed", type=int, default=2026)
    demo.add_argument(
        "--no-pacs",
        action="store_true",
        help="enroll the first visits instead of fetching them from a local Orthanc",
    )


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

    from medreid.processes import run_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    name = args.name or f"{os.uname().nodename}:worker/{os.getpid()}/0"
    run_worker(settings, name=name, should_stop=stop.is_set)
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from medreid.demo import run_demo

    config = str(args.config) if args.config else os.environ.get("MEDREID_CONFIG")
    return run_demo(
        settings, config, args.out, patients=args.patients, seed=args.seed, pacs=not args.no_pacs
    )


def cmd_config(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    for key, value in describe(settings):
        print(f"{key} = {value}")
    return 0


COMMANDS = {"serve": cmd_serve, "worker": cmd_worker, "config": cmd_config, "demo": cmd_demo}
