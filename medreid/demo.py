"""`medreid demo`: the newcomer's five minutes in one command.

Generate a small hospital with deliberate errors. Where Orthanc is installed, store its first
visits in a local Orthanc as the hospital's PACS, from which the service fetches each
patient's priors itself; otherwise enroll them. Send the second visits by C-STORE to the
service (started here if nothing listens on the configured port), and show what the service
caught beside the generator's ground truth.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from medreid.enrollment import enroll_folder
from medreid.orthanc import ORTHANC, Orthanc
from medreid.settings import Settings
from pipeline.modelstore import generated_image_models
from pipeline.verdicts import IdentityVerdict, ModalityVerdict
from storage.db import upgrade
from storage.models import GalleryEntry, GalleryOrigin, Instance, Result, SeriesVerdictRow
from synthetic.hospital import SynthOptions, generate, read_manifest

DEMO_CALLING_AE = "MEDREID-DEMO"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _start_service(
    config: str | None, host: str, port: int, log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "medreid.cli"]
    if config:
        command += ["--config", config]
    log = log_path.open("wb")
    process = subprocess.Popen(
        [*command, "serve"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
    )
    deadline = time.monotonic() + 120
    while not _listening(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"medreid demo: the service did not start; its log: {log_path}")
        time.sleep(0.3)
    return process


def _send(files: list[Path], host: str, port: int, called_ae: str) -> int:
    """C-STORE the files: DCMTK storescu where installed, pynetdicom otherwise."""
    if shutil.which("storescu"):
        sent = subprocess.run(
            ["storescu", "-aet", DEMO_CALLING_AE, "-aec", called_ae, host, str(port)]
            + [str(f) for f in files],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
        )
        if sent.returncode != 0:
            raise SystemExit(f"medreid demo: storescu failed: {sent.stderr.strip()[-500:]}")
        return len(files)
    from pynetdicom import AE

    from scp.pynetdicom_adapter import guard_requests

    ae = AE(ae_title=DEMO_CALLING_AE)
    datasets = [dcmread(f) for f in files]
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = guard_requests(ae.associate(host, port, ae_title=called_ae))
    if not assoc.is_established:
        raise SystemExit("medreid demo: the service refused the association")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            stored += getattr(status, "Status", None) == 0
    finally:
        assoc.release()
    return stored


def _wait_for_series(
    sessions: sessionmaker[Session], uids: set[str], timeout_s: float
) -> dict[str, tuple[str | None, str | None]]:
    deadline = time.monotonic() + timeout_s
    judged: dict[str, tuple[str | None, str | None]] = {}
    while uids and time.monotonic() < deadline:
        with sessions.begin() as session:
            judged = {
                v.series_instance_uid: (v.modality_verdict, v.identity_verdict)
                for v in session.scalars(
                    select(SeriesVerdictRow).where(
                        SeriesVerdictRow.series_instance_uid.in_(list(uids))
                    )
                )
            }
        if len(judged) == len(uids):
            break
        time.sleep(1.0)
    return judged


def run_demo(
    settings: Settings,
    config: str | None,
    out: Path,
    *,
    patients: int = 12,
    seed: int = 2026,
    timeout_s: float = 300.0,
    pacs: bool = True,
) -> int:
    from medreid.app import build_database

    peers = settings.scp.allowed_peers
    if peers and not any(p.partition("@")[0] == DEMO_CALLING_AE for p in peers):
        print(f"note: add {DEMO_CALLING_AE} to scp.allowed_peers, or the service refuses it")
    upgrade(settings.database.url)
    engine, sessions = build_database(settings)
    host = (
        "127.0.0.1" if settings.scp.bind_address in ("0.0.0.0", "::") else settings.scp.bind_address
    )
    service: subprocess.Popen[bytes] | None = None
    orthanc: Orthanc | None = None
    try:
        if not (out / "manifest.csv").is_file():
            print(f"1/4 generating {patients} patients x 2 visits under {out} (seed {seed}) ...")
            generate(
                SynthOptions(
                    out=out,
                    patients=patients,
                    visits=2,
                    seed=seed,
                    slices=3,
                    mislabel_modality=0.15,
                    swap_patient=0.15,
                )
            )
        else:
            print(f"1/4 using the hospital already generated under {out}")
        rows = list(read_manifest(out / "manifest.csv"))
        running = _listening(host, settings.scp.port)
        env: dict[str, str] = {}
        if not running and settings.models.dir.is_dir():
            # The default X-ray and dermoscopy models are fitted on real patients; generated
            # ones are judged by the models trained on generated images.
            generated = generated_image_models(settings.models.dir, out / "models")
            settings = replace(settings, models=replace(settings.models, dir=generated))
            env["MEDREID_MODELS_DIR"] = str(generated.resolve())
            print(f"    models: those of {generated} (the ones trained on generated images)")
        if pacs and ORTHANC is not None and not running:
            orthanc = Orthanc(out / "orthanc", medreid_port=settings.scp.port)
            first = [r for r in rows if r["visit"] == "1" and r["swapped"] != "True"]
            print(
                f"2/4 storing {len(first)} first-visit images in Orthanc, the hospital's PACS "
                f"(ORTHANC@127.0.0.1:{orthanc.dicom_port}, web: http://127.0.0.1:"
                f"{orthanc.http_port}); nothing is enrolled: medreid fetches each patient's "
                "priors from it (C-FIND, C-GET) as images arrive ..."
            )
            for row in first:
                orthanc.post("/instances", (out / row["path"]).read_bytes())
            env["MEDREID_PRIORS_NODES"] = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        else:
            if pacs and ORTHANC is None:
                print("    (Orthanc is not installed: the first visits are enrolled instead)")
            print("2/4 enrolling the first visits under their true identities (the folders) ...")
            counts = enroll_folder(settings, sessions, out, "medreid-demo", files="v1_*")
            print("    " + ", ".join(f"{model}: {n}" for model, n in sorted(counts.items())))
        if not running:
            print(f"    starting medreid serve on port {settings.scp.port} for the demo ...")
            service = _start_service(config, host, settings.scp.port, out / "serve.log", env)
        second = [r for r in rows if r["visit"] == "2"]
        print(
            f"3/4 sending {len(second)} images of the second visits to "
            f"{settings.scp.ae_title}@{host}:{settings.scp.port} "
            f"({sum(r['swapped'] == 'True' for r in second)} filed under another patient, "
            f"{sum(r['mislabelled'] == 'True' for r in second)} with a wrong Modality tag) ..."
        )
        _send([out / r["path"] for r in second], host, settings.scp.port, settings.scp.ae_title)
        wanted = {r["sop_instance_uid"]: r for r in second}
        deadline = time.monotonic() + timeout_s
        verdicts: dict[str, Result] = {}
        while time.monotonic() < deadline:
            with sessions.begin() as session:
                found = session.execute(
                    select(Result, Instance)
                    .join(Instance, Instance.id == Result.instance_id)
                    .where(Instance.sop_instance_uid.in_(list(wanted)))
                ).all()
                verdicts = {i.sop_instance_uid: r for r, i in found}
                session.expunge_all()
            if len(verdicts) == len(wanted):
                break
            time.sleep(1.0)
        print(f"4/4 {len(verdicts)} of {len(wanted)} images analysed")
        tally: Counter[str] = Counter()
        for uid, row in wanted.items():
            result = verdicts.get(uid)
            if result is None:
                continue
            wrong_tag = row["mislabelled"] == "True"
            swapped = row["swapped"] == "True"
            tally["wrong tags"] += wrong_tag
            tally["wrong tags caught"] += (
                wrong_tag and result.modality_verdict == ModalityVerdict.MISMATCH
            )
            tally["right tags flagged"] += (
                not wrong_tag
            ) and result.modality_verdict == ModalityVerdict.MISMATCH
            tally["swaps"] += swapped
            tally["swaps caught"] += swapped and result.identity_verdict == IdentityVerdict.MISMATCH
            tally["others flagged"] += (
                not swapped
            ) and result.identity_verdict == IdentityVerdict.MISMATCH
        series = {
            r["series_instance_uid"]: r
            for r in second
            if r["header_modality"] in settings.analysis.series_modalities
        }
        print(
            f"    waiting up to {settings.analysis.series_quiet_s + 20:g} s for the verdicts of "
            f"{len(series)} CT and MR series (judged once quiet) ..."
        )
        judged = _wait_for_series(sessions, set(series), settings.analysis.series_quiet_s + 20)
        for uid, (modality, identity) in judged.items():
            row = series[uid]
            tally["series judged"] += 1
            tally["series wrong tags"] += row["mislabelled"] == "True"
            tally["series wrong tags caught"] += row["mislabelled"] == "True" and (
                modality == ModalityVerdict.MISMATCH
            )
            tally["series swaps"] += row["swapped"] == "True"
            tally["series swaps caught"] += (
                row["swapped"] == "True" and identity == IdentityVerdict.MISMATCH
            )
            tally["series false alarms"] += (
                row["swapped"] != "True" and identity == IdentityVerdict.MISMATCH
            ) + (row["mislabelled"] != "True" and modality == ModalityVerdict.MISMATCH)
        if orthanc is not None:
            with sessions.begin() as session:
                priors = session.scalar(
                    select(func.count(GalleryEntry.id)).where(
                        GalleryEntry.origin == GalleryOrigin.PACS_PRIOR
                    )
                )
            print(f"    references fetched from the PACS: {priors} images")
        print(
            f"    wrong Modality tags caught: {tally['wrong tags caught']} of "
            f"{tally['wrong tags']} (false alarms: {tally['right tags flagged']})\n"
            f"    images filed under another patient caught: {tally['swaps caught']} of "
            f"{tally['swaps']} (false alarms: {tally['others flagged']})\n"
            f"    series judged: {tally['series judged']} of {len(series)}; wrong tags caught "
            f"{tally['series wrong tags caught']} of {tally['series wrong tags']}, swaps caught "
            f"{tally['series swaps caught']} of {tally['series swaps']}, false alarms "
            f"{tally['series false alarms']}\n"
            "Look for yourself:\n"
            "    medreid results --verdict mismatch\n"
            '    medreid audit --event "Security Alert"\n'
            "    medreid results --series   (CT and MR series, "
            f"{settings.analysis.series_quiet_s:g} s after their last image)\n"
            f"    ground truth: {out / 'manifest.csv'}"
        )
        return 0 if len(verdicts) == len(wanted) else 1
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=60)
        if orthanc is not None:
            orthanc.stop()
        engine.dispose()
