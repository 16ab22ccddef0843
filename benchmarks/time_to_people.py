"""How long a flagged image takes to reach people: from the C-STORE that medreid acknowledged
to the alert's DICOM report stored in the PACS (Orthanc), and to its webhook delivery.

A generated hospital's first visits are enrolled; its second visits, with swapped patients
and wrong Modality tags, are sent to `medreid serve` one image at a time at a steady pace.
For every image alert: the time from the image's acknowledgement to the report's C-STORE
completing (the delivery's ``sent_at``) and to the webhook's arrival at a local receiver.
Series alerts wait for their series to be quiet (``--series-quiet-s``) and are reported apart.
Prints p50 and p95 beside the outbox's poll interval, the floor of the wait in this design.

    python -m benchmarks.time_to_people [--patients 12] [--poll-interval-s 2]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from sqlalchemy import select

from medreid.orthanc import ORTHANC, Orthanc
from storage.db import make_engine, make_sessionmaker, upgrade
from storage.models import Alert, AlertEvent, Delivery
from support.service import (
    RunningService,
    first_visit_gallery,
    free_port,
    generated_image_model_set,
    send_with_pynetdicom,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate

# Generated hospitals are judged by the models trained on generated images.
MODELS = generated_image_model_set()
SECRET = "a benchmark's shared secret"


class Arrivals:
    """A webhook receiver that notes when each alert's first event arrived."""

    def __init__(self) -> None:
        self.at: dict[tuple[int, str], float] = {}
        arrivals = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                arrivals.at.setdefault((body["alert_id"], body["event"]), time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_s": round(float(np.percentile(values, 50)), 3),
        "p95_s": round(float(np.percentile(values, 95)), 3),
        "max_s": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--poll-interval-s", type=float, default=2.0, help="outbox.poll_interval_s")
    parser.add_argument("--series-quiet-s", type=float, default=5.0)
    parser.add_argument("--pace-s", type=float, default=0.5, help="between two images sent")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/time_to_people.json"))
    args = parser.parse_args()
    if ORTHANC is None:
        raise SystemExit("Orthanc is not installed (Debian: orthanc)")
    work = Path(tempfile.mkdtemp(prefix="medreid-ttp-"))
    hospital = work / "hospital"
    generate(
        SynthOptions(
            out=hospital,
            patients=args.patients,
            visits=2,
            seed=args.seed,
            slices=1,
            mislabel_modality=0.25,
            swap_patient=0.25,
        )
    )
    rows = list(csv.DictReader((hospital / "manifest.csv").open()))
    url = f"sqlite:///{work / 'medreid.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    arrivals = Arrivals()
    pacs_port, port = free_port(), free_port()
    orthanc = Orthanc(work / "orthanc", medreid_port=free_port(), dicom_port=pacs_port)
    service = RunningService(
        workdir=work,
        port=port,
        env=service_env(
            work,
            url,
            port,
            MEDREID_MODELS_DIR=str(MODELS),
            MEDREID_ANALYSIS_SERIES_QUIET_S=str(args.series_quiet_s),
            MEDREID_OUTBOX_REPORT_DESTINATIONS=f"ORTHANC@127.0.0.1:{pacs_port}",
            MEDREID_OUTBOX_POLL_INTERVAL_S=str(args.poll_interval_s),
            MEDREID_WEBHOOKS_URLS=arrivals.url,
            MEDREID_WEBHOOKS_SECRET=SECRET,
        ),
    )
    acknowledged: dict[str, float] = {}
    try:
        gallery = first_visit_gallery(hospital, rows, work / "gallery")
        service.cli("enroll", str(gallery))
        service.start(timeout=180)
        for row in rows:
            if row["visit"] != "2":
                continue
            path = hospital / row["path"]
            orthanc.post("/instances", path.read_bytes())  # the PACS holds what it forwards
            if send_with_pynetdicom(path, port, calling="CT_SCANNER") == 0:
                uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
                acknowledged[str(uid)] = time.time()
            time.sleep(args.pace_s)
        wait_for_queue(sessions, timeout=600)
        deadline = time.monotonic() + args.series_quiet_s + 60
        while time.monotonic() < deadline:
            with sessions.begin() as session:
                pending = session.scalars(select(Delivery).where(Delivery.state == "pending")).all()
            if not pending and time.monotonic() > deadline - 55:
                break
            time.sleep(0.5)
        with sessions.begin() as session:
            found = session.execute(
                select(Alert, AlertEvent, Delivery)
                .join(AlertEvent, AlertEvent.alert_id == Alert.id)
                .join(Delivery, Delivery.event_id == AlertEvent.id)
                .where(AlertEvent.event == "alert.raised")
            ).all()
            facts = [
                (a.id, a.scope, a.sop_instance_uid, d.channel, d.sent_at, d.state)
                for a, _, d in found
            ]
    finally:
        service.stop()
        orthanc.stop()
        engine.dispose()
    report: dict[str, list[float]] = {"image_to_report": [], "image_to_webhook": []}
    unsent = 0
    for alert_id, scope, sop, channel, sent_at, state in facts:
        if scope != "image" or sop not in acknowledged:
            continue
        if state != "sent" or sent_at is None:
            unsent += 1
            continue
        start = acknowledged[sop]
        if channel == "dicom":
            when = (sent_at if sent_at.tzinfo else sent_at.replace(tzinfo=dt.UTC)).timestamp()
            report["image_to_report"].append(when - start)
        else:
            arrived = arrivals.at.get((alert_id, "alert.raised"))
            if arrived is not None:
                report["image_to_webhook"].append(arrived - start)
    result = {
        "images_sent": len(acknowledged),
        "alerts_of_images": len({f[0] for f in facts if f[1] == "image"}),
        "alerts_of_series": len({f[0] for f in facts if f[1] == "series"}),
        "unsent": unsent,
        "poll_interval_s": args.poll_interval_s,
        "c_store_to_report": percentiles(report["image_to_report"]),
        "c_store_to_webhook": percentiles(report["image_to_webhook"]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
