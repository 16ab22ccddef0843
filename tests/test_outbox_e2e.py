"""Alerts reach people end to end: a generated hospital's second visits, some with wrong
Modality tags, sent to `medreid serve`; every flagged image or series has
exactly one alert, and every alert exactly one report in Orthanc (in the flagged study) and one
webhook delivery, although Orthanc is down and the webhook receiver refuses at first, and
medreid is killed with SIGKILL while the messages are pending."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from medreid.orthanc import ORTHANC, Orthanc
from storage.models import Alert, AlertEvent, Delivery, Result, SeriesVerdictRow
from support.service import (
    RunningService,
    free_port,
    generated_image_model_set,
    send_with_pynetdicom,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate
from tests.conftest import Database
from tests.test_webhooks import SECRET, Receiver

# Generated hospitals are judged by the models trained on generated images.
MODELS = generated_image_model_set()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)"
    ),
    pytest.mark.skipif(not (MODELS / "compa-v1").is_dir(), reason="the default models are absent"),
]


def counts(database: Database) -> tuple[int, int, int]:
    with database.sessions.begin() as session:
        events = session.scalar(select(func.count()).select_from(AlertEvent)) or 0
        pending = session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.state == "pending")
        )
        deliveries = session.scalar(select(func.count()).select_from(Delivery)) or 0
    return int(events), int(pending or 0), int(deliveries)


def until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_every_alert_reaches_orthanc_and_the_webhook_once_through_a_crash(
    sqlite_database: Database, tmp_path: Path
) -> None:
    # One backend: the outbox's claims on both are test_webhooks'; this is the service's loop.
    database = sqlite_database
    hospital = tmp_path / "hospital"
    generate(
        SynthOptions(
            out=hospital,
            patients=6,
            visits=2,
            seed=11,
            slices=1,
            mislabel_modality=0.3,
            swap_patient=0.3,
        )
    )
    rows = list(csv.DictReader((hospital / "manifest.csv").open()))
    receiver = Receiver([503] * 10_000)  # refuses everything until told otherwise
    pacs_port, port = free_port(), free_port()
    env = service_env(
        tmp_path,
        database.url,
        port,
        MEDREID_MODELS_DIR=str(MODELS),
        MEDREID_ANALYSIS_SERIES_QUIET_S="1",
        MEDREID_OUTBOX_REPORT_DESTINATIONS=f"ORTHANC@127.0.0.1:{pacs_port}",
        MEDREID_OUTBOX_BACKOFF_S="0.2",
        MEDREID_OUTBOX_BACKOFF_MAX_S="1",
        MEDREID_OUTBOX_MAX_ATTEMPTS="1000",
        MEDREID_OUTBOX_POLL_INTERVAL_S="0.2",
        MEDREID_OUTBOX_REPORT_TIMEOUT_S="3",
        MEDREID_WEBHOOKS_URLS=receiver.url,
        MEDREID_WEBHOOKS_SECRET=SECRET,
    )
    service = RunningService(workdir=tmp_path, port=port, env=env)
    orthanc: Orthanc | None = None
    try:
        # Nobody is enrolled: the wrong Modality tags raise the alerts (an image's and its
        # series'), which travel through the same outbox as a wrong patient's would, and the
        # test is spared a process that loads every model to enroll.
        service.start(timeout=180)
        second = [hospital / r["path"] for r in rows if r["visit"] == "2"]
        for path in second:
            assert send_with_pynetdicom(path, port, calling="CT_SCANNER") == 0
        wait_for_queue(database.sessions, timeout=300)
        # the series are judged once quiet; then every event has its two pending deliveries
        until(
            lambda: (c := counts(database))[0] > 0 and c[2] == 2 * c[0] and c[1] == c[2],
            60,
            "the alerts' deliveries",
        )
        time.sleep(2)  # a few refused tries each
        service.kill()  # SIGKILL, with every message pending

        receiver.script.clear()  # the receiver takes everything now
        orthanc = Orthanc(tmp_path / "orthanc", medreid_port=free_port(), dicom_port=pacs_port)
        for path in second:  # the PACS holds the second visits, as it forwarded them
            orthanc.post("/instances", path.read_bytes())
        service.start(timeout=180)
        until(lambda: counts(database)[1] == 0, 120, "every delivery sent")
        events, _, deliveries = counts(database)

        with database.sessions.begin() as session:
            alerts = session.scalars(select(Alert)).all()
            flagged_images = session.scalar(
                select(func.count())
                .select_from(Result)
                .where(
                    (Result.modality_verdict == "mismatch")
                    | (Result.identity_verdict == "mismatch")
                )
            )
            per_result: dict[int, int] = {}
            for a in alerts:
                if a.result_id is not None:
                    per_result[a.result_id] = per_result.get(a.result_id, 0) + 1
            mismatched_series = session.scalars(
                select(SeriesVerdictRow).where(
                    (SeriesVerdictRow.modality_verdict == "mismatch")
                    | (SeriesVerdictRow.identity_verdict == "mismatch")
                )
            ).all()
            assert len(per_result) == flagged_images and flagged_images
            series_alerts = [a for a in alerts if a.series_verdict_id is not None]
            assert {a.series_verdict_id for a in series_alerts} == {s.id for s in mismatched_series}
            assert events == len(alerts) and deliveries == 2 * events
            studies = {a.id: str(a.study_instance_uid) for a in alerts}

        # one report an alert, in the flagged study
        reports = []
        for study in orthanc.get("/studies"):
            for series in orthanc.get(f"/studies/{study}/series"):
                if series["MainDicomTags"]["Modality"] == "SR":
                    for instance in series["Instances"]:
                        reports.append(
                            (
                                orthanc.get(f"/studies/{study}")["MainDicomTags"][
                                    "StudyInstanceUID"
                                ],
                                instance,
                            )
                        )
        assert len(reports) == len(alerts)
        assert sorted(uid for uid, _ in reports) == sorted(studies.values())
        # one webhook an event, each accepted once
        ids = [json.loads(body)["delivery_id"] for _, body in receiver.accepted]
        assert len(ids) == len(set(ids)) == events
    finally:
        service.stop()
        receiver.close()
        if orthanc is not None:
            orthanc.stop()
