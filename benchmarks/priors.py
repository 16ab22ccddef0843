"""What the PACS priors catch, and what they cost a job.

1. One generated hospital judged twice: once with its first visits in the PACS (Orthanc) and
   nothing enrolled, each patient's references fetched on demand by C-FIND and C-GET; once
   with the same first visits enrolled by hand (`medreid enroll`) and no PACS. Its second
   visits, with whole series misfiled under another patient, are sent by DCMTK storescu.
   Per run: misfiled series caught (a patient-mismatch alert on the series or one of its
   images), false alarms among the correctly filed series and images.
2. The worker's added work per image for its priors (PriorsFetcher.check, in process,
   against Orthanc, with the default models): p50 and p95 when they must be fetched and
   when they are held.

    python -m benchmarks.priors [--patients 20] [--misfiled 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from medreid.builders import build_database, build_priors
from medreid.orthanc import ORTHANC, Orthanc
from medreid.priors import PriorsWanted
from medreid.processes import build_analyser
from medreid.settings import DEFAULT_CONFIG, load_settings
from storage.db import make_engine, make_sessionmaker, upgrade
from storage.models import Alert, GalleryEntry, Instance, Result, SeriesVerdictRow
from support.misfile import misfile_series
from support.service import (
    RunningService,
    first_visit_gallery,
    free_port,
    generated_image_model_set,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate, read_manifest

# Generated hospitals are judged by the models trained on generated images.
MODELS = generated_image_model_set()


def judged(
    work: Path, hospital: Path, rows: list[dict[str, str]], misfiled: set[str], **env: str
) -> dict[str, Any]:
    """Send the second visits to a fresh medreid; what it flagged."""
    work.mkdir()
    url = f"sqlite:///{work / 'medreid.sqlite3'}"
    upgrade(url)
    port = free_port()
    service = RunningService(
        workdir=work,
        port=port,
        env=service_env(
            work,
            url,
            port,
            MEDREID_MODELS_DIR=str(MODELS),
            MEDREID_ANALYSIS_SERIES_QUIET_S="1",
            **env,
        ),
    )
    second = [r for r in rows if r["visit"] == "2"]
    if "MEDREID_PRIORS_NODES" not in env:
        service.cli("enroll", str(first_visit_gallery(hospital, rows, work / "gallery")))
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    service.start(timeout=180)
    started = time.monotonic()
    try:
        sent = subprocess.run(
            ["storescu", "-aec", "MEDREID", "127.0.0.1", str(port)]
            + [str(hospital / r["path"]) for r in second],
            env={**service.env, "TCP_NODELAY": "1"},
            capture_output=True,
            timeout=600,
        )
        assert sent.returncode == 0, sent.stderr
        wait_for_queue(sessions, timeout=900)
        ct = {r["series_instance_uid"] for r in second if r["header_modality"] in ("CT", "MR")}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sessions.begin() as session:
                if (session.scalar(select(func.count(SeriesVerdictRow.id))) or 0) >= len(ct):
                    break
            time.sleep(0.5)
        seconds = time.monotonic() - started
        with sessions.begin() as session:
            flagged = set(
                session.scalars(
                    select(Alert.series_instance_uid).where(Alert.kind == "patient_mismatch")
                )
            )
            verdicts = dict(
                session.execute(
                    select(Instance.sop_instance_uid, Result.identity_verdict).join(
                        Result, Result.instance_id == Instance.id
                    )
                ).all()
            )
            references = session.scalar(select(func.count(GalleryEntry.id)))
    finally:
        service.stop()
        engine.dispose()
    series = {r["series_instance_uid"] for r in second}
    fine = series - misfiled
    fine_images = [r for r in second if r["series_instance_uid"] not in misfiled]
    return {
        "references": references,
        "misfiled_series": len(misfiled),
        "misfiled_series_caught": len(misfiled & flagged),
        "recall": round(len(misfiled & flagged) / max(len(misfiled), 1), 3),
        "correct_series": len(fine),
        "correct_series_flagged": len(fine & flagged),
        "series_false_alarm_rate": round(len(fine & flagged) / max(len(fine), 1), 3),
        "correct_images": len(fine_images),
        "correct_images_flagged": sum(
            verdicts.get(r["sop_instance_uid"]) == "mismatch" for r in fine_images
        ),
        "correct_images_unverifiable": sum(
            verdicts.get(r["sop_instance_uid"]) == "unverifiable" for r in fine_images
        ),
        "seconds_to_judge": round(seconds, 1),
    }


def added_work(work: Path, pacs: Orthanc, rows: list[dict[str, str]]) -> dict[str, Any]:
    """PriorsFetcher.check per patient and modality: fetched (not cached), then held."""
    url = f"sqlite:///{work / 'added.sqlite3'}"
    upgrade(url)
    settings = load_settings(
        DEFAULT_CONFIG,
        env={
            "MEDREID_DATABASE_URL": url,
            "MEDREID_MODELS_DIR": str(MODELS),
            "MEDREID_SPOOL_DIR": str(work / "spool"),
            "MEDREID_PRIORS_NODES": f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
        },
    )
    engine, sessions = build_database(settings)
    analyser = build_analyser(settings, sessions)
    assert analyser is not None
    analyser.refresh()
    fetcher = build_priors(settings, sessions, analyser, "benchmark")
    assert fetcher is not None
    timings: dict[str, list[float]] = {"not_cached": [], "cached": []}
    for patient in sorted({r["true_patient"] for r in rows}):
        for modality in ("xray", "ct"):
            for case in ("not_cached", "cached"):
                started = time.perf_counter()
                (check,) = fetcher.check([PriorsWanted(patient, modality, None)]).values()
                timings[case].append((time.perf_counter() - started) * 1000.0)
                assert check.available and check.studies, check
    engine.dispose()
    return {
        case: {
            "n": len(values),
            "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p95_ms": round(float(np.percentile(values, 95)), 1),
        }
        for case, values in timings.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--misfiled", type=int, default=6, help="second-visit series misfiled")
    parser.add_argument("--seed", type=int, default=41)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/priors.json"))
    args = parser.parse_args()
    if ORTHANC is None or shutil.which("storescu") is None:
        raise SystemExit("Orthanc and DCMTK are needed (Debian: orthanc, dcmtk)")
    work = Path(tempfile.mkdtemp(prefix="medreid-priors-"))
    hospital = work / "hospital"
    generate(
        SynthOptions(
            out=hospital,
            patients=args.patients,
            visits=2,
            seed=args.seed,
            slices=3,
            modalities=("xray", "ct"),
        )
    )
    rows = list(read_manifest(hospital / "manifest.csv"))
    misfiled = misfile_series(hospital, rows, args.misfiled)
    pacs = Orthanc(work / "orthanc", medreid_port=free_port())
    try:
        for row in rows:
            if row["visit"] == "1":
                pacs.post("/instances", (hospital / row["path"]).read_bytes())
        report = {
            "hospital": {
                "patients": args.patients,
                "seed": args.seed,
                "second_visit_images": sum(r["visit"] == "2" for r in rows),
            },
            "pacs_priors": judged(
                work / "pacs",
                hospital,
                rows,
                misfiled,
                MEDREID_PRIORS_NODES=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
            ),
            "hand_enrolled": judged(work / "enrolled", hospital, rows, misfiled),
            "added_work_per_check": added_work(work, pacs, rows),
        }
    finally:
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
