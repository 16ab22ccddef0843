"""Sustained pipeline throughput of `medreid serve` per modality, with the time per stage and
the latency from acknowledgement to stored result.

For each modality, a generated hospital of that modality only (seed 321, never used in
training): visit 1 is enrolled, visit 2 is sent to a fresh running service (SQLite, the
default models) in two phases:

1. **flood**: every image as fast as two concurrent associations can send; the sustained rate
   is the images over the time from the first result to the last;
2. **paced**: at half the measured sustained rate, one association, for the p50 / p95 latency
   from an image's acknowledgement (its row) to its stored result.

    python -m benchmarks.pipeline_throughput [--modalities ct,mri,xray,dermoscopy]
        [--images 600] [--workers 1]

CT and MRI visits are series of ``--slices`` images; X-ray and dermoscopy visits are one image,
so those hospitals have more patients for the same number of images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select

from scp.pynetdicom_adapter import guard_requests
from storage.db import make_engine, make_sessionmaker
from storage.models import Instance, Result
from support.service import (
    RunningService,
    first_visit_gallery,
    free_port,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate, read_manifest

EXPLICIT_LE = "1.2.840.10008.1.2.1"
TARGET_PER_S = 30  # for CT; the other modalities are reported beside it


def send(port: int, paths: list[Path], rate_per_s: float | None = None) -> int:
    """C-STORE every file over one association (at ``rate_per_s``, where given, on a fixed
    schedule); the number acknowledged with Success."""
    ae = AE(ae_title="BENCH")
    classes = {str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths[:50]}
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class, EXPLICIT_LE)
    assoc = guard_requests(ae.associate("127.0.0.1", port, ae_title="MEDREID"))
    if not assoc.is_established:
        raise RuntimeError("association rejected")
    ok = 0
    started = time.monotonic()
    try:
        for n, path in enumerate(paths):
            if rate_per_s:
                time.sleep(max(0.0, started + n / rate_per_s - time.monotonic()))
            status = assoc.send_c_store(dcmread(path))
            ok += getattr(status, "Status", None) == 0
    finally:
        assoc.release()
    return ok


def send_parallel(port: int, paths: list[Path], associations: int) -> int:
    counts = [0] * associations
    threads = [
        threading.Thread(
            target=lambda i=i: counts.__setitem__(i, send(port, paths[i::associations]))
        )
        for i in range(associations)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measured(sessions: Any, sop_uids: set[str]) -> dict[str, Any]:
    with sessions.begin() as session:
        rows = [
            (i.received_at, r.created_at, dict(r.timings_ms), r.identity_verdict)
            for r, i in session.execute(
                select(Result, Instance).join(Instance, Instance.id == Result.instance_id)
            ).all()
            if i.sop_instance_uid in sop_uids
        ]
    received = [r[0] for r in rows]
    finished = [r[1] for r in rows]
    latencies = [(done - got).total_seconds() for got, done, _, _ in rows]
    stages: dict[str, list[float]] = defaultdict(list)
    for _, _, timings, _ in rows:
        for stage, ms in timings.items():
            if stage != "models_failed":
                stages[stage].append(float(ms))
    span = (max(finished) - min(finished)).total_seconds() if len(rows) > 1 else 0.0
    return {
        "images": len(rows),
        "ingest_per_s": round(
            len(rows) / max((max(received) - min(received)).total_seconds(), 1e-9), 1
        ),
        "results_per_s": round((len(rows) - 1) / span, 1) if span else None,
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "stage_ms_mean": {k: round(statistics.fmean(v), 2) for k, v in sorted(stages.items())},
        "with_identity_verdict": sum(r[3] is not None for r in rows),
    }


def run_modality(modality: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="medreid-bench-"))
    volume = modality in ("ct", "mri")
    slices = args.slices if volume else 1
    patients = max(4, args.images // slices)
    service: RunningService | None = None
    try:
        hospital = work / "hospital"
        print(f"{modality}: generating {patients} patients x 2 visits x {slices} images ...")
        generate(
            SynthOptions(
                out=hospital,
                patients=patients,
                visits=2,
                modalities=(modality,),
                seed=321,
                slices=slices,
            )
        )
        rows = list(read_manifest(hospital / "manifest.csv"))
        gallery = first_visit_gallery(hospital, rows, work / "gallery")
        second = [row for row in rows if row["visit"] == "2"]
        half = len(second) // 2
        flood = [hospital / r["path"] for r in second[:half]]
        paced = [hospital / r["path"] for r in second[half:]]
        shape = dcmread(flood[0], stop_before_pixels=True)

        port = free_port()
        url = f"sqlite:///{work / 'medreid.db'}"
        env = service_env(
            work,
            url,
            port,
            MEDREID_MODELS_DIR=str(args.models),
            MEDREID_WORKERS_PROCESSES=str(args.workers),
            MEDREID_WORKERS_BATCH_SIZE=str(args.batch_size),
            MEDREID_LOGGING_LEVEL="WARNING",
        )
        service = RunningService(workdir=work, port=port, env=env)
        service.cli("db", "upgrade")
        enrolled = service.cli("enroll", str(gallery))
        print(enrolled.stdout.strip().splitlines()[-1])
        started = time.monotonic()
        service.start(timeout=120)
        print(f"listening after {time.monotonic() - started:.1f} s")
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        # warm the workers (model load) on a few images, outside the measurement
        send(port, flood[:4])
        wait_for_queue(sessions, timeout=300)

        print(f"flood: {len(flood) - 4} images over 2 associations ...")
        acked = send_parallel(port, flood[4:], 2)
        wait_for_queue(sessions, timeout=1800)
        flood_uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in flood[4:]}
        flood_report = measured(sessions, flood_uids)
        flood_report["acknowledged"] = acked

        rate = (flood_report["results_per_s"] or 10.0) / 2
        print(f"paced: {len(paced)} images at {rate:.1f} per second ...")
        acked = send(port, paced, rate_per_s=rate)
        wait_for_queue(sessions, timeout=1800)
        paced_uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paced}
        paced_report = measured(sessions, paced_uids)
        paced_report["acknowledged"] = acked
        paced_report["offered_per_s"] = round(rate, 1)
        engine.dispose()
    finally:
        if service is not None:
            # also when a phase fails: a service left running would hold its ports and
            # its workers' memory long after the benchmark; its log says what it saw
            failed = sys.exc_info()[0] is not None
            code = service.stop()
            if failed or code not in (0, None):
                print(f"medreid serve (exit {code}), its log's end:\n{service.log()[-4000:]}")
        shutil.rmtree(work, ignore_errors=True)
    samples = int(getattr(shape, "SamplesPerPixel", 1))
    return {
        "modality": modality,
        "image": f"{shape.Rows}x{shape.Columns}"
        + (f"x{samples}" if samples > 1 else "")
        + f", {shape.BitsAllocated}-bit, explicit VR little endian",
        "flood": flood_report,
        "paced_half_load": paced_report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modalities", default="ct,mri,xray,dermoscopy")
    parser.add_argument("--images", type=int, default=600, help="images per visit, about")
    parser.add_argument("--slices", type=int, default=15, help="CT and MRI images per series")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", type=Path, default=Path("models").resolve())
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/pipeline.json"))
    args = parser.parse_args()

    runs = [run_modality(m.strip(), args) for m in args.modalities.split(",") if m.strip()]
    report = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "target_per_s": TARGET_PER_S,
        "modalities": runs,
        "ratio_to_target": {
            r["modality"]: round((r["flood"]["results_per_s"] or 0) / TARGET_PER_S, 2) for r in runs
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    for r in runs:
        print(
            f"{r['modality']:>10}  {r['image']:<40} {r['flood']['results_per_s']:>6} results/s  "
            f"p50/p95 at half load {r['paced_half_load']['latency_p50_s']:.3f}/"
            f"{r['paced_half_load']['latency_p95_s']:.3f} s  stages {r['flood']['stage_ms_mean']}"
        )


if __name__ == "__main__":
    main()
