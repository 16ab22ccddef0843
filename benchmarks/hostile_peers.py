"""Hostile peers against a real ``medreid serve``: stalled association requests, a flood of
connections that open and close, a deflate bomb, an endless PDU, and a seeded fuzz run of
association requests. For each: whether honest peers are still served and how fast, what the
bomb is answered, what each mutated request got, and how much the service's memory grows.

    python -m benchmarks.hostile_peers [--checkout DIR] [--out FILE.json]

``--checkout`` runs the service from another checkout of medreid (an earlier commit, say),
so that before and after are measured by the same probe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from benchmarks import attacks
from benchmarks.procstat import PeakRss, rss_bytes
from medreid.orthanc import free_port
from scp.pynetdicom_adapter import guard_requests

CHECKOUT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


class Service:
    """``medreid serve`` (receiver only, no workers) from a checkout, on a fresh database."""

    def __init__(self, checkout: Path, work: Path, **settings: str) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(checkout),
            "PYTHONUNBUFFERED": "1",
            "MEDREID_DATABASE_URL": f"sqlite:///{work / 'medreid.sqlite3'}",
            "MEDREID_SPOOL_DIR": str(work / "spool"),
            "MEDREID_SCP_PORT": str(self.port),
            "MEDREID_SCP_BIND_ADDRESS": "0.0.0.0",
            "MEDREID_METRICS_PORT": "0",
            "MEDREID_SPOOL_MIN_FREE_MB": "64",
            "MEDREID_WORKERS_PROCESSES": "0",
            "MEDREID_LOGGING_LEVEL": "WARNING",
            **settings,
        }
        subprocess.run(
            [sys.executable, "-m", "medreid.cli", "db", "upgrade"],
            env=self.env,
            cwd=work,
            check=True,
            capture_output=True,
        )
        self.log = (work / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medreid.cli", "serve"],
            env=self.env,
            cwd=work,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while echo(self.port, timeout=2) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("medreid serve did not start")
            time.sleep(0.2)

    def rss(self) -> int:
        return rss_bytes(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def echo(port: int, *, host: str = "127.0.0.1", timeout: float = 30) -> float | None:
    """Seconds an honest C-ECHO took (association included), or None if it failed."""
    ae = AE(ae_title="HONEST")
    ae.acse_timeout = timeout
    ae.network_timeout = timeout
    ae.dimse_timeout = timeout
    ae.add_requested_context(attacks.VERIFICATION)
    started = time.monotonic()
    assoc = guard_requests(
        ae.associate("127.0.0.1", port, ae_title="MEDREID", bind_address=(host, 0))
    )
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        ok = "Status" in status and status.Status == 0
    finally:
        assoc.release()
    return time.monotonic() - started if ok else None


def echo_until_served(port: int, *, host: str, give_up_s: float) -> dict[str, Any]:
    """Honest C-ECHOs one after another until one succeeds: how long that took in all."""
    started = time.monotonic()
    attempts = 0
    while time.monotonic() - started < give_up_s:
        attempts += 1
        took = echo(port, host=host, timeout=min(30.0, give_up_s))
        if took is not None:
            return {"served_after_s": round(time.monotonic() - started, 2), "attempts": attempts}
        time.sleep(0.5)
    return {"served_after_s": None, "attempts": attempts, "gave_up_after_s": give_up_s}


def stalled_connections(port: int, count: int, give_up_s: float) -> dict[str, Any]:
    stalled = attacks.open_stalled(port, count)
    try:
        time.sleep(0.5)
        other_host = echo_until_served(port, host="127.0.0.2", give_up_s=give_up_s)
        same_host = echo_until_served(port, host="127.0.0.1", give_up_s=give_up_s)
        closed_by_service = 0
        for sock in stalled:
            sock.settimeout(0.05)
            try:
                if sock.recv(1) == b"":
                    closed_by_service += 1
            except TimeoutError:
                pass
            except OSError:
                closed_by_service += 1
    finally:
        for sock in stalled:
            sock.close()
    return {
        "stalled_connections": count,
        "honest_echo_from_another_host": other_host,
        "honest_echo_from_the_same_host": same_host,
        "stalled_closed_by_the_service_by_then": closed_by_service,
    }


def connect_and_close_flood(port: int, count: int, give_up_s: float) -> dict[str, Any]:
    import socket

    started = time.monotonic()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    flood_s = time.monotonic() - started
    return {
        "connections": count,
        "flood_s": round(flood_s, 2),
        "honest_echo_from_the_same_host": echo_until_served(
            port, host="127.0.0.1", give_up_s=give_up_s
        ),
    }


@dataclass
class Watch:
    """What an attack took: seconds, and the service's peak memory above where it began."""

    took_s: float = 0.0
    rss_growth_mb: float = 0.0

    def report(self, service: Service) -> dict[str, Any]:
        return {
            "took_s": round(self.took_s, 2),
            "rss_growth_mb": round(self.rss_growth_mb, 1),
            "still_serving": service.process.poll() is None and echo(service.port) is not None,
        }


@contextlib.contextmanager
def watched(service: Service, settle_s: float = 0.0) -> Iterator[Watch]:
    """Time the block, and sample the service's memory during it and ``settle_s`` after."""
    watch = Watch()
    before = service.rss()
    with PeakRss(service.process.pid, interval_s=0.02) as sampler:
        started = time.monotonic()
        yield watch
        watch.took_s = time.monotonic() - started
        time.sleep(settle_s)
    watch.rss_growth_mb = (sampler.peak - before) / MB


def deflate_bomb(service: Service, work: Path) -> dict[str, Any]:
    path = attacks.write_deflate_bomb(work / "bomb.dcm")
    ae = AE(ae_title="BOMBER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    syntax = attacks.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    ae.add_requested_context(attacks.SECONDARY_CAPTURE, [syntax])
    status: dict[str, Any] = {}
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    with watched(service, settle_s=1.0) as watch:
        assoc = guard_requests(ae.associate("127.0.0.1", service.port, ae_title="MEDREID"))
        if assoc.is_established:
            answer = assoc.send_c_store(path)
            status = {
                "status": f"0x{int(answer.Status):04X}" if "Status" in answer else None,
                "error_comment": str(answer.get("ErrorComment", "")) or None,
            }
            assoc.release()
    return {
        "file_mb": round(path.stat().st_size / MB, 2),
        "inflates_to_mb": 1024,
        **status,
        **watch.report(service),
    }


def endless_pdu(service: Service, total_mb: int) -> dict[str, Any]:
    with watched(service, settle_s=1.0) as watch:
        taken = attacks.stream_endless_pdu(service.port, total_mb * MB)
    return {
        "announced_bytes": 0xFFFFFFFF,
        "streamed_mb_before_the_service_closed": round(taken / MB, 1),
        "offered_mb": total_mb,
        **watch.report(service),
    }


def fuzz(service: Service, cases: int) -> dict[str, Any]:
    with watched(service) as watch:
        outcomes = attacks.fuzz_requests(service.port, cases=cases, seed=20261205)
    return {
        "cases": cases,
        "request_deadline_s": 1.0,
        "outcomes": dict(outcomes),
        **watch.report(service),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=CHECKOUT)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--give-up-s", type=float, default=90.0)
    parser.add_argument("--stream-mb", type=int, default=256)
    parser.add_argument("--fuzz-cases", type=int, default=400)
    parser.add_argument(
        "--attacks", default="stalled,flood,deflate_bomb,endless_pdu,fuzz", help="which to run"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {"checkout": str(args.checkout.resolve())}
    with tempfile.TemporaryDirectory(prefix="medreid-hostile-") as scratch:
        work = Path(scratch)
        for name, run in (
            ("stalled", lambda s: stalled_connections(s.port, 16, args.give_up_s)),
            ("flood", lambda s: connect_and_close_flood(s.port, 200, args.give_up_s)),
            ("deflate_bomb", lambda s: deflate_bomb(s, work)),
            ("endless_pdu", lambda s: endless_pdu(s, args.stream_mb)),
            ("fuzz", lambda s: fuzz(s, args.fuzz_cases)),
        ):
            if name not in args.attacks.split(","):
                continue
            folder = work / name
            folder.mkdir()
            deadline = {"MEDREID_SCP_ACSE_TIMEOUT_S": "1"} if name == "fuzz" else {}
            service = Service(args.checkout, folder, **deadline)
            try:
                results[name] = {"idle_rss_mb": round(service.rss() / MB, 1), **run(service)}
            finally:
                service.stop()
            print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
