"""`python -m tests.crashpoint serve ...`: `medreid serve`, killed with SIGKILL (with its
workers, its whole process group) at one point of the C-STORE path, the Nth time it gets
there: MEDREID_TEST_CRASH_AT = after_staging (the dataset written under its .part name),
after_rename (placed under its final name, its row not committed) or after_commit (the row
committed, the Success not yet sent); MEDREID_TEST_CRASH_ON = N (1 by default)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

POINTS = ("after_staging", "after_rename", "after_commit")


def _die_after(function: Callable[..., Any], on: int) -> Callable[..., Any]:
    calls = 0
    lock = threading.Lock()

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = function(*args, **kwargs)
        with lock:
            calls += 1
            if calls == on:
                os.killpg(os.getpgrp(), signal.SIGKILL)
        return result

    return wrapper


def install(point: str, on: int) -> None:
    from scp.spool import Spool
    from scp.store import StoreService

    if point == "after_staging":
        Spool.stage = _die_after(Spool.stage, on)  # type: ignore[method-assign]
    elif point == "after_rename":
        Spool.place = _die_after(Spool.place, on)  # type: ignore[method-assign]
    elif point == "after_commit":
        StoreService.store = _die_after(StoreService.store, on)  # type: ignore[method-assign]
    else:
        raise SystemExit(f"MEDREID_TEST_CRASH_AT: {point!r} is not one of {', '.join(POINTS)}")


if __name__ == "__main__":
    install(os.environ["MEDREID_TEST_CRASH_AT"], int(os.environ.get("MEDREID_TEST_CRASH_ON", "1")))
    from medreid.cli import main

    raise SystemExit(main(sys.argv[1:]))
