"""Ingest side by side: the same files, sent by DCMTK storescu and by four concurrent pynetdicom
associations, to medreid (durable: fsync and a database row before Success; once receiving only
and once with its pipeline running) and to two receivers that keep files only:
pynetdicom's storescp and DCMTK's storescp.

    python -m benchmarks.ingest [--ct 2000] [--radiographs 200] [--compressed 200] [--quick]
                                [--rounds 3]

The receivers take turns, round after round, on each set and sender. Prints the median instances
and MB per second of the rounds (and their range), each receiver's CPU time and peak RSS, and
the ratios of medreid to each baseline (of the medians, and round by round); writes JSON and a
PNG beside them. ``--receivers`` may add "medreid (spool fsync off)", which is not durable: it
shows what the spool's fsyncs cost, in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import RLELossless
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from benchmarks.procstat import PeakRss, cpu_seconds, rss_bytes
from scp.pynetdicom_adapter import guard_requests
from support.dicom_factory import encode, make_dataset
from support.service import free_port
from synthetic.hospital import SynthOptions, generate

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
# medreid is run from the checkout this file is in, whatever is installed
CHECKOUT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the files


def make_files(root: Path, ct: int, radiographs: int, compressed: int) -> dict[str, list[Path]]:
    """Generated once under ``root`` and reused."""
    sets: dict[str, list[Path]] = {}
    ct_dir = root / f"ct{ct}"
    if not ct_dir.is_dir():
        print(f"generating {ct} CT images of 512 x 512 ...", flush=True)
        generate(
            SynthOptions(
                out=ct_dir,
                patients=max(1, ct // 20),
                visits=1,
                modalities=("ct",),
                seed=404,
                slices=20,
            )
        )
    sets["ct"] = sorted(ct_dir.rglob("*.dcm"))[:ct]
    dx_dir = root / f"dx{radiographs}"
    if not dx_dir.is_dir():
        print(f"generating {radiographs} radiographs of 2000 x 2000 ...", flush=True)
        dx_dir.mkdir(parents=True)
        rng = np.random.default_rng(404)
        y, x = np.mgrid[0:2000, 0:2000]
        base = (1500 + 800 * np.sin(x / 300.0) * np.cos(y / 410.0)).astype(np.int32)
        for n in range(radiographs):
            pixels = np.clip(base + rng.integers(0, 200, base.shape), 0, 4095).astype(np.uint16)
            ds = make_dataset(pixels, sop_class_uid=DX_STORAGE, modality="DX", patient_id=f"R{n}")
            (dx_dir / f"{n:04d}.dcm").write_bytes(encode(ds))
    sets["radiograph"] = sorted(dx_dir.glob("*.dcm"))[:radiographs]
    rle_dir = root / f"rle{compressed}"
    if not rle_dir.is_dir():
        print(f"compressing {compressed} CT images with RLE ...", flush=True)
        rle_dir.mkdir(parents=True)
        for n, path in enumerate(sets["ct"][:compressed]):
            ds = dcmread(path)
            ds.compress(RLELossless)
            ds.save_as(rle_dir / f"{n:04d}.dcm", enforce_file_format=True)
    sets["ct_rle"] = sorted(rle_dir.glob("*.dcm"))[:compressed]
    return sets


# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    started_s: float


def _wait_listening(process: subprocess.Popen[bytes], port: int, timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("receiver did not listen")


def start_receiver(name: str, work: Path, models: Path) -> Receiver:
    port = free_port()
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name.startswith("medreid"):
        env.update(
            PYTHONPATH=str(CHECKOUT),
            MEDREID_DATABASE_URL=f"sqlite:///{out / 'medreid.sqlite3'}",
            MEDREID_SPOOL_DIR=str(out / "spool"),
            MEDREID_SCP_PORT=str(port),
            MEDREID_SCP_BIND_ADDRESS="127.0.0.1",
            MEDREID_METRICS_PORT="0",
            MEDREID_SPOOL_MIN_FREE_MB="64",
            MEDREID_LOGGING_LEVEL="WARNING",
            MEDREID_MODELS_DIR=str(models),
            MEDREID_WORKERS_PROCESSES="1" if name == WITH_PIPELINE else "0",
            MEDREID_WORKERS_BATCH_SIZE="32",
            MEDREID_SPOOL_FSYNC="false" if name == SPOOL_FSYNC_OFF else "true",
        )
        subprocess.run(
            [sys.executable, "-m", "medreid.cli", "db", "upgrade"],
            env=env,
            check=True,
            capture_output=True,
        )
        command = [sys.executable, "-m", "medreid.cli", "serve"]
    elif name == "pynetdicom storescp":
        command = [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-q",
                   "-od", str(out), "-pdu", "131072", "-ba", "127.0.0.1"]  # fmt: skip
    else:
        # as for storescu: Debian's DCMTK crawls on loopback without it
        env["TCP_NODELAY"] = "1"
        command = ["storescp", "--max-pdu", "131072", "+xa", "-od", str(out), str(port)]
    started = time.monotonic()
    log = (work / f"{name.replace(' ', '_')}.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)
    _wait_listening(process, port)
    return Receiver(name, process, port, time.monotonic() - started)


def stop_receiver(receiver: Receiver) -> None:
    receiver.process.terminate()
    try:
        receiver.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        receiver.process.kill()


# --------------------------------------------------------------------------- senders


def send_storescu(files: list[Path], port: int, syntax_flag: str | None) -> int:
    listing = Path(tempfile.mkdtemp()) / "files"
    listing.mkdir()
    for n, path in enumerate(files):
        (listing / f"{n:05d}.dcm").symlink_to(path.resolve())
    command = ["storescu", "-aet", "BENCH", "-aec", "MEDREID", "+sd", "-nh"]
    if syntax_flag:
        command.append(syntax_flag)
    sent = subprocess.run(
        [*command, "127.0.0.1", str(port), str(listing)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
    )
    shutil.rmtree(listing.parent)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-400:]}")
    return len(files)


def send_pynetdicom(files: list[Path], port: int, associations: int = 4) -> int:
    """The files' bytes as they are, over concurrent associations."""
    first = dcmread(files[0], stop_before_pixels=True)
    sop_class, syntax = str(first.SOPClassUID), str(first.file_meta.TransferSyntaxUID)
    acked = [0] * associations

    def run(index: int) -> None:
        ae = AE(ae_title="BENCH")
        ae.maximum_pdu_size = 131072
        ae.add_requested_context(sop_class, syntax)
        assoc = guard_requests(ae.associate("127.0.0.1", port, ae_title="MEDREID"))
        if not assoc.is_established:
            return
        for path in files[index::associations]:
            status = assoc.send_c_store(path)
            acked[index] += getattr(status, "Status", None) == 0
        assoc.release()

    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    threads = [threading.Thread(target=run, args=(i,)) for i in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(acked)


# --------------------------------------------------------------------------- measuring

WITH_PIPELINE = "medreid + pipeline"
# Not durable, so not run unless asked for: what the spool's two fsyncs per instance cost.
SPOOL_FSYNC_OFF = "medreid (spool fsync off)"
RECEIVERS = ("medreid", WITH_PIPELINE, "pynetdicom storescp", "DCMTK storescp")
ALL_RECEIVERS = (*RECEIVERS, SPOOL_FSYNC_OFF)


def measure(receiver: Receiver, files: list[Path], send: Callable[[], int]) -> dict[str, Any]:
    cpu_before = cpu_seconds(receiver.process.pid)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    with PeakRss(receiver.process.pid) as peak:
        started = time.monotonic()
        acked = send()
        seconds = time.monotonic() - started
    return {
        "files": len(files),
        "acknowledged": acked,
        "seconds": round(seconds, 2),
        "instances_per_s": round(len(files) / seconds, 1),
        "mb_per_s": round(megabytes / seconds, 1),
        "cpu_s": round(cpu_seconds(receiver.process.pid) - cpu_before, 2),
        "peak_rss_mb": round(peak.peak / 1e6, 1),
    }


def measure_once(
    name: str,
    set_name: str,
    files: list[Path],
    sender: str,
    syntax_flag: str | None,
    args: argparse.Namespace,
    work: Path,
    service: dict[str, Any],
) -> dict[str, Any]:
    """One receiver, fresh, receiving one set from one sender."""
    receiver = start_receiver(name, work / f"{set_name}-{sender[:5]}", args.models)
    if name.startswith("medreid") and name not in service:
        time.sleep(15.0 if name == WITH_PIPELINE else 2.0)  # workers load models
        service[name] = {
            "start_up_s": round(receiver.started_s, 2),
            "idle_rss_mb": round(rss_bytes(receiver.process.pid) / 1e6, 1),
        }
    elif name == WITH_PIPELINE:
        time.sleep(15.0)

    def send() -> int:
        if sender == "storescu":
            return send_storescu(files, receiver.port, syntax_flag)
        return send_pynetdicom(files, receiver.port)

    try:
        row = measure(receiver, files, send)
    except RuntimeError as exc:
        row = {"files": len(files), "error": str(exc)[:200]}
    finally:
        stop_receiver(receiver)
        shutil.rmtree(work / f"{set_name}-{sender[:5]}" / name, ignore_errors=True)
    row.update(receiver=name, set=set_name, sender=sender)
    return row


def _key(run: dict[str, Any]) -> tuple[str, str, str]:
    return run["receiver"], run["set"], run["sender"]


def median_row(
    receiver: str, set_name: str, sender: str, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The median of a receiver's rounds, with the range of its rates."""
    mine = [r for r in runs if _key(r) == (receiver, set_name, sender) and "instances_per_s" in r]
    row: dict[str, Any] = {"receiver": receiver, "set": set_name, "sender": sender}
    if not mine:
        return {**row, "error": "no run completed"}
    for key in ("instances_per_s", "mb_per_s", "cpu_s", "peak_rss_mb", "seconds"):
        row[key] = round(float(np.median([r[key] for r in mine])), 2)
    rates = [r["instances_per_s"] for r in mine]
    row.update(files=mine[0]["files"], rounds=len(mine), rate_min=min(rates), rate_max=max(rates))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", type=int, default=2000)
    parser.add_argument("--radiographs", type=int, default=200)
    parser.add_argument("--compressed", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="500 CT, 40 radiographs, 50 RLE")
    parser.add_argument(
        "--receivers",
        default=",".join(RECEIVERS),
        help=f"comma-separated, of: {', '.join(ALL_RECEIVERS)}",
    )
    parser.add_argument("--sets", default="ct,radiograph,ct_rle")
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each receiver gets each set (the median)"
    )
    parser.add_argument("--data", type=Path, default=Path("var/bench-data"))
    parser.add_argument("--models", type=Path, default=Path("models").resolve())
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args()
    if args.quick:
        args.ct, args.radiographs, args.compressed = 500, 40, 50
    sets = make_files(args.data, args.ct, args.radiographs, args.compressed)
    # Files just generated may still be being written out by the kernel: measured before
    # that is done, the first receiver would share the disk with it.
    os.sync()
    sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    receivers = [r for r in ALL_RECEIVERS if r in args.receivers.split(",")]
    syntax_flags = {"ct": None, "radiograph": None, "ct_rle": "-xr"}
    runs: list[dict[str, Any]] = []
    service: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="medreid-ingest-"))
    try:
        # Receivers take turns on each set and sender, round after round, so that a drift of
        # this machine's speed falls on all of them alike; each figure is a median of rounds.
        for set_name, files in sets.items():
            for sender in ("storescu", "pynetdicom x4"):
                for round_number in range(1, args.rounds + 1):
                    for name in receivers:
                        run = measure_once(
                            name, set_name, files, sender, syntax_flags[set_name], args, work,
                            service,
                        )  # fmt: skip
                        run["round"] = round_number
                        runs.append(run)
                        print(json.dumps(run), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        median_row(receiver, set_name, sender, runs)
        for receiver in receivers
        for set_name in sets
        for sender in ("storescu", "pynetdicom x4")
    ]

    def rate(receiver: str, set_name: str, sender: str) -> float | None:
        for row in rows:
            if _key(row) == (receiver, set_name, sender):
                return row.get("instances_per_s")
        return None

    def round_rates(receiver: str, set_name: str, sender: str) -> dict[int, float]:
        return {
            r["round"]: r["instances_per_s"]
            for r in runs
            if _key(r) == (receiver, set_name, sender) and "instances_per_s" in r
        }

    ratios: list[dict[str, Any]] = []
    for set_name, sender, medreid, baseline in itertools.product(
        sets,
        ("storescu", "pynetdicom x4"),
        ("medreid", SPOOL_FSYNC_OFF),
        ("pynetdicom storescp", "DCMTK storescp"),
    ):
        if medreid not in receivers or baseline not in receivers:
            continue
        ours, theirs = rate(medreid, set_name, sender), rate(baseline, set_name, sender)
        mine, other = (round_rates(r, set_name, sender) for r in (medreid, baseline))
        per_round = [round(mine[k] / other[k], 2) for k in sorted(mine) if k in other]
        ratios.append(
            {
                "receiver": medreid,
                "set": set_name,
                "sender": sender,
                "baseline": baseline,
                "medreid_over_baseline": round(ours / theirs, 2) if ours and theirs else None,
                "per_round": per_round,
            }
        )
    print()
    print(f"medians of {args.rounds} rounds")
    print(f"{'receiver':26} {'set':11} {'sender':14} {'inst/s':>8} {'range':>13} {'MB/s':>7} "
          f"{'CPU s':>7} {'peak RSS MB':>11}")  # fmt: skip
    for row in rows:
        spread = f"{row['rate_min']}-{row['rate_max']}" if "rate_min" in row else "-"
        print(
            f"{row['receiver']:26} {row['set']:11} {row['sender']:14} "
            f"{row.get('instances_per_s', '-'):>8} {spread:>13} {row.get('mb_per_s', '-'):>7} "
            f"{row.get('cpu_s', '-'):>7} {row.get('peak_rss_mb', '-'):>11}"
        )
    print()
    for ratio in ratios:
        rounds = ", ".join(str(r) for r in ratio["per_round"])
        print(
            f"{ratio['receiver']:>26} / {ratio['baseline']:20} {ratio['set']:11} "
            f"{ratio['sender']:14} {ratio['medreid_over_baseline']}   (each round: {rounds or '-'})"
        )
    report = {
        "rows": rows,
        "ratios": ratios,
        "runs": runs,
        "service": service,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(rows, args.json.with_suffix(".png"))
    print(f"\n{args.json}, {args.json.with_suffix('.png')}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["set"], r["sender"]) for r in rows})
    shown = [name for name in ALL_RECEIVERS if any(r["receiver"] == name for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(shown)
    for k, receiver in enumerate(shown):
        found = [next((r for r in rows if _key(r) == (receiver, *g)), {}) for g in groups]
        values = [r.get("instances_per_s", 0) for r in found]
        # the range of the rounds around each median
        spread = np.array(
            [
                [v - r.get("rate_min", v) for v, r in zip(values, found, strict=True)],
                [r.get("rate_max", v) - v for v, r in zip(values, found, strict=True)],
            ]
        )
        ax.bar(
            np.arange(len(groups)) + k * width,
            values,
            width,
            yerr=spread,
            capsize=2,
            label=receiver,
        )
    ax.set_xticks(np.arange(len(groups)) + width * (len(shown) - 1) / 2)
    ax.set_xticklabels([f"{s}\n{snd}" for s, snd in groups])
    ax.set_ylabel("instances per second (median and range of rounds)")
    ax.set_title("Ingest on this machine (medreid durable: fsync + database row before Success)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
