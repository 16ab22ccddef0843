"""Requests whose response pynetdicom's own association thread takes and drops, with its
pause as it is and with ``scp.pynetdicom_adapter.guard_requests``, in the same run.

    python -m benchmarks.request_race [--echoes 1000] [--dimse-timeout-s 0.5] [--busy-threads 2]

One association to a local pynetdicom SCP sends C-ECHOs one after another while other
threads keep the interpreter busy, as a worker's inference would. An echo whose response is
taken by the reactor comes back empty after the DIMSE timeout; the association is then
opened again.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE

from scp.contexts import VERIFICATION_CLASS
from scp.pynetdicom_adapter import guard_requests


def lost_echoes(
    port: int, echoes: int, dimse_timeout_s: float, busy_threads: int, prepare: Callable[[Any], Any]
) -> tuple[int, float]:
    """How many echoes of ``echoes`` came back empty, and the seconds they all took."""
    ae = AE(ae_title="RACE")
    ae.add_requested_context(VERIFICATION_CLASS)
    ae.dimse_timeout = dimse_timeout_s
    busy = threading.Event()

    def keep_busy() -> None:
        count = 0
        while not busy.is_set():
            count += 1

    burners = [threading.Thread(target=keep_busy, daemon=True) for _ in range(busy_threads)]
    for burner in burners:
        burner.start()
    lost = 0
    started = time.monotonic()
    assoc = prepare(ae.associate("127.0.0.1", port))
    try:
        for _ in range(echoes):
            if "Status" not in assoc.send_c_echo():
                lost += 1
                assoc.abort()
                assoc = prepare(ae.associate("127.0.0.1", port))
    finally:
        if assoc.is_established:
            assoc.release()
        busy.set()
        for burner in burners:
            burner.join()
    return lost, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--echoes", type=int, default=1000)
    parser.add_argument("--dimse-timeout-s", type=float, default=0.5)
    parser.add_argument("--busy-threads", type=int, default=2)
    args = parser.parse_args()
    scp = AE(ae_title="ANSWERS")
    scp.add_supported_context(VERIFICATION_CLASS)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    assert server is not None  # not blocking: the server is returned
    port = server.server_address[1]
    try:
        plain = lost_echoes(
            port, args.echoes, args.dimse_timeout_s, args.busy_threads, lambda assoc: assoc
        )
        guarded = lost_echoes(
            port, args.echoes, args.dimse_timeout_s, args.busy_threads, guard_requests
        )
    finally:
        server.shutdown()
    print(
        json.dumps(
            {
                "echoes": args.echoes,
                "dimse_timeout_s": args.dimse_timeout_s,
                "busy_threads": args.busy_threads,
                "lost_with_pynetdicoms_pause": plain[0],
                "lost_guarded": guarded[0],
                "seconds_with_pynetdicoms_pause": round(plain[1], 1),
                "seconds_guarded": round(guarded[1], 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
