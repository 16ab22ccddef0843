"""The whole pipeline in the service: generated studies with known swaps and wrong Modality
tags, visit 1 enrolled, visit 2 sent with DCMTK storescu; verdicts checked against the manifest."""

from __future__ import annotations

import csv
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from medreid.orthanc import ORTHANC
from storage.models import Instance, Result, SeriesVerdictRow
from support.service import (
    RunningService,
    first_visit_gallery,
    free_port,
    generated_image_model_set,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate
from tests.conftest import Database

# Generated hospitals are judged by the models trained on generated images.
MODELS = generated_image_model_set()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.db,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed"),
    pytest.mark.skipif(not (MODELS / "compa-v1").is_dir(), reason="the default models are absent"),
]


@pytest.fixture
def hospital(tmp_path: Path) -> Path:
    out = tmp_path / "hospital"
    generate(
        SynthOptions(
            out=out,
            patients=10,
            visits=2,
            seed=7,
            slices=3,
            mislabel_modality=0.2,
            swap_patient=0.2,
        )
    )
    return out


@pytest.fixture
def service(database: Database, tmp_path: Path) -> Iterator[RunningService]:
    port = free_port()
    running = RunningService(
        workdir=tmp_path,
        port=port,
        env=service_env(
            tmp_path,
            database.url,
            port,
            MEDREID_MODELS_DIR=str(MODELS),
            MEDREID_ANALYSIS_SERIES_QUIET_S="1",
        ),
    )
    yield running
    running.stop()


def test_swaps_and_wrong_tags_are_caught(
    hospital: Path, service: RunningService, database: Database, tmp_path: Path
) -> None:
    rows = list(csv.DictReader((hospital / "manifest.csv").open()))
    # Enroll visit 1 under the true identities (its folders), as a gallery built from
    # verified earlier studies would be.
    gallery = first_visit_gallery(hospital, rows, tmp_path / "gallery")
    enrolled = service.cli("enroll", str(gallery))
    assert "embeddings enrolled" in enrolled.stdout, enrolled.stderr
    service.start(timeout=180)
    second = [row for row in rows if row["visit"] == "2"]
    sent = subprocess.run(
        [
            "storescu",
            "-aec",
            "MEDREID",
            "127.0.0.1",
            str(service.port),
            *[str(hospital / row["path"]) for row in second],
        ],
        env={**service.env, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr
    wait_for_queue(database.sessions, timeout=300)
    with database.sessions.begin() as session:
        verdicts = {
            instance.sop_instance_uid: result
            for result, instance in session.execute(
                select(Result, Instance).join(Instance, Instance.id == Result.instance_id)
            ).all()
        }
    assert set(verdicts) == {row["sop_instance_uid"] for row in second}
    modality_hits = modality_false = identity_hits = identity_false = misread = 0
    for row in second:
        result = verdicts[row["sop_instance_uid"]]
        assert result.status == "ok" and result.model_versions
        misread += result.predicted_modality != row["true_modality"]
        if row["mislabelled"] == "True":
            modality_hits += result.modality_verdict == "mismatch"
        else:
            modality_false += result.modality_verdict != "agree"
        if row["swapped"] == "True":
            identity_hits += result.identity_verdict == "mismatch"
        else:
            identity_false += result.identity_verdict == "mismatch"
    mislabelled = sum(row["mislabelled"] == "True" for row in second)
    swapped = sum(row["swapped"] == "True" for row in second)
    print(
        f"\nmodality misread in {misread} of {len(second)} images; "
        f"{modality_hits}/{mislabelled} wrong tags caught, {modality_false} "
        f"false alarms of {len(second) - mislabelled}; identity: {identity_hits}/{swapped} "
        f"swaps caught, {identity_false} false alarms of {len(second) - swapped}"
    )
    assert mislabelled > 0 and swapped > 0
    # Image by image, an end slice of a volume can read as "other"; the series verdicts
    # below must be exact.
    assert misread <= 0.05 * len(second)
    assert modality_hits >= 0.9 * mislabelled and modality_false <= 0.05 * len(second)
    assert identity_hits >= 0.75 * swapped
    assert identity_false <= 0.1 * (len(second) - swapped)
    alerts = service.cli_json("audit", "--event", "Security Alert")
    kinds = {a["event_type"] for a in alerts}
    assert {"Modality Mismatch", "Patient Mismatch"} <= kinds
    listed = service.cli_json("results", "--verdict", "mismatch")
    assert len(listed) >= modality_hits

    # One series verdict per CT and MR series (by header Modality), once each is quiet.
    series = {
        row["series_instance_uid"]: row for row in second if row["header_modality"] in ("CT", "MR")
    }
    assert series
    deadline = time.monotonic() + 60
    while True:
        with database.sessions.begin() as session:
            judged = {
                v.series_instance_uid: (v.images, v.modality_verdict, v.identity_verdict)
                for v in session.scalars(select(SeriesVerdictRow))
            }
        if len(judged) >= len(series) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(judged) == set(series)
    series_swaps = series_caught = 0
    for uid, row in series.items():
        images, modality, identity = judged[uid]
        assert images == sum(r["series_instance_uid"] == uid for r in second)
        assert modality == ("mismatch" if row["mislabelled"] == "True" else "agree")
        series_swaps += row["swapped"] == "True"
        series_caught += row["swapped"] == "True" and identity == "mismatch"
    assert series_caught >= 0.75 * series_swaps
    listed_series = service.cli_json("results", "--series")
    assert {s["series_instance_uid"] for s in listed_series} == set(series)


@pytest.mark.parametrize("pacs", [True, False], ids=["orthanc-as-pacs", "enrolled"])
def test_demo_walks_a_newcomer_through_in_one_command(tmp_path: Path, pacs: bool) -> None:
    if pacs and ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    port = free_port()
    env = service_env(
        tmp_path,
        f"sqlite:///{tmp_path / 'demo.db'}",
        port,
        MEDREID_MODELS_DIR=str(MODELS),
        MEDREID_ANALYSIS_SERIES_QUIET_S="1",
    )
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "medreid.cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--patients",
            "4",
            *([] if pacs else ["--no-pacs"]),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "starting medreid serve" in demo.stdout
    fetched = re.search(r"references fetched from the PACS: (\d+) images", demo.stdout)
    if pacs:  # nothing enrolled: each patient's references came from Orthanc
        assert "nothing is enrolled" in demo.stdout and fetched and int(fetched.group(1)) > 0
    else:
        assert "enrolling the first visits" in demo.stdout and fetched is None
    analysed = re.search(r"4/4 (\d+) of (\d+) images analysed", demo.stdout)
    assert analysed and analysed.group(1) == analysed.group(2)
    judged = re.search(r"series judged: (\d+) of (\d+)", demo.stdout)
    assert judged and judged.group(1) == judged.group(2) != "0"
    # the service it started is gone again
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
