"""PACS priors: the settings, the fetch schedule in the database, and Orthanc as the PACS
whose real C-FIND, C-GET and C-MOVE give each patient's references, with no enrollment;
Orthanc stopped in the middle of a run."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from medreid.orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc
from medreid.settings import DEFAULT_CONFIG, SettingsError, load_settings
from storage.models import (
    Alert,
    AuditEvent,
    GalleryEntry,
    Instance,
    Job,
    PriorFetch,
    PriorFetchState,
    Result,
    SeriesVerdictRow,
)
from storage.priors import PriorsKey, fetch_failed, priors_held, take_fetch_lease
from support.misfile import misfile_series
from support.service import (
    RunningService,
    free_port,
    generated_image_model_set,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate, read_manifest
from tests.conftest import Database

# Generated hospitals are judged by the models trained on generated images.
MODELS = generated_image_model_set()
KEY = PriorsKey("P1", "ct", "reid-ct-x")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MEDREID_PRIORS_NODES": "ORTHANC@pacs"}, "priors.nodes"),
        ({"MEDREID_PRIORS_NODES": "ORTHANC@pacs:4242 fetch"}, "priors.nodes"),
        ({"MEDREID_PRIORS_RETRIEVAL": "wado"}, "priors.retrieval"),
        ({"MEDREID_PRIORS_BUDGET_S": "0"}, "priors.budget_s"),
        ({"MEDREID_PRIORS_MAX_CONCURRENT": "0"}, "priors.max_concurrent"),
        ({"MEDREID_PRIORS_MOVE_AE": "A_TITLE_TOO_LONG_FOR_DICOM"}, "priors.move_ae"),
    ],
)
def test_invalid_priors_settings_name_their_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError, match=key):
        load_settings(DEFAULT_CONFIG, env=env)


def test_priors_are_off_by_default_and_each_node_may_name_its_retrieval() -> None:
    assert not load_settings(DEFAULT_CONFIG, env={}).priors.enabled
    settings = load_settings(
        DEFAULT_CONFIG,
        env={"MEDREID_PRIORS_NODES": "PACS@10.0.0.5:104, ARCHIVE@10.0.0.6:11112 move"},
    ).priors
    assert [(n.name, str(n.retrieval)) for n in settings.pacs_nodes()] == [
        ("PACS@10.0.0.5:104", "get"),
        ("ARCHIVE@10.0.0.6:11112", "move"),
    ]


@pytest.mark.db
def test_unavailable_priors_are_asked_for_again_on_a_doubling_schedule_then_given_up(
    database: Database,
) -> None:
    now = dt.datetime(2026, 12, 6, 8, 0, tzinfo=dt.UTC)
    waits = []
    with database.sessions.begin() as session:
        for attempt in range(4):
            state = fetch_failed(
                session,
                key=KEY,
                error="ORTHANC@pacs:4242: association refused or not answering",
                retry_s=60,
                retry_max_s=150,
                max_attempts=4,
                now=now,
            )
            held = priors_held(session, key=KEY)
            waits.append(
                (held.next_attempt_at - now).total_seconds() if held.next_attempt_at else None
            )
            assert state == (
                PriorFetchState.GAVE_UP if attempt == 3 else PriorFetchState.UNAVAILABLE
            )
        assert held.last_error is not None and "refused" in held.last_error
    assert waits == [60, 120, 150, None]


@pytest.mark.db
def test_one_worker_at_a_time_asks_the_pacs_for_a_patient(database: Database) -> None:
    now = dt.datetime(2026, 12, 6, 8, 0, tzinfo=dt.UTC)
    with database.sessions.begin() as session:
        assert take_fetch_lease(session, key=KEY, lease_s=30, now=now)
    with database.sessions.begin() as session:
        assert not take_fetch_lease(session, key=KEY, lease_s=30, now=now)
        # a lease whose worker died runs out
        assert take_fetch_lease(session, key=KEY, lease_s=30, now=now + dt.timedelta(seconds=31))


# ----------------------------------------------------------------------- Orthanc as the PACS


def with_orthanc_and_models(test: Callable[..., None]) -> Callable[..., None]:
    for mark in (
        pytest.mark.skipif(
            ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)"
        ),
        pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed"),
        pytest.mark.skipif(
            not (MODELS / "compa-v1").is_dir(), reason="the default models are absent"
        ),
        pytest.mark.timeout(600),
    ):
        test = mark(test)
    return test


@pytest.fixture
def first_visits_in_pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, Path, list[dict[str, str]]]]:
    hospital = tmp_path / "hospital"
    generate(
        SynthOptions(
            out=hospital, patients=8, visits=2, seed=31, slices=3, modalities=("xray", "ct")
        )
    )
    rows = list(read_manifest(hospital / "manifest.csv"))
    pacs = Orthanc(tmp_path / "orthanc", medreid_port=free_port())
    for row in rows:
        if row["visit"] == "1":
            pacs.post("/instances", (hospital / row["path"]).read_bytes())
    yield pacs, hospital, rows
    pacs.stop()


def medreid_with_priors(tmp_path: Path, url: str, pacs: Orthanc, **more: str) -> RunningService:
    port = free_port()
    settings = {
        "MEDREID_MODELS_DIR": str(MODELS),
        "MEDREID_ANALYSIS_SERIES_QUIET_S": "1",
        "MEDREID_PRIORS_NODES": f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
        **more,
    }
    return RunningService(
        workdir=tmp_path, port=port, env=service_env(tmp_path, url, port, **settings)
    )


def send(service: RunningService, hospital: Path, rows: list[dict[str, str]]) -> None:
    sent = subprocess.run(
        ["storescu", "-aec", "MEDREID", "127.0.0.1", str(service.port)]
        + [str(hospital / r["path"]) for r in rows],
        env={**service.env, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr


@pytest.mark.parametrize("retrieval", ["get", "move", "dicomweb"])
@with_orthanc_and_models
def test_swaps_are_caught_against_the_patients_own_priors_with_no_enrollment(
    first_visits_in_pacs: tuple[Orthanc, Path, list[dict[str, str]]],
    sqlite_database: Database,
    tmp_path: Path,
    retrieval: str,
) -> None:
    pacs, hospital, rows = first_visits_in_pacs
    extra: dict[str, str] = {}
    if retrieval == "dicomweb" and not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    if retrieval != "get":
        # the PACS must know our C-MOVE destination, or serve DICOMweb: restart it so
        pacs.stop()
        move_port = free_port()
        pacs = Orthanc(
            pacs.workdir,
            medreid_port=free_port(),
            dicom_port=pacs.dicom_port,
            http_port=pacs.http_port,
            modalities={"medreid-priors": ["MEDREID_PRIORS", "127.0.0.1", move_port]},
            dicomweb=retrieval == "dicomweb",
        )
        extra = (
            {"MEDREID_PRIORS_RETRIEVAL": "move", "MEDREID_PRIORS_MOVE_PORT": str(move_port)}
            if retrieval == "move"
            else {"MEDREID_PRIORS_NODES": pacs.dicomweb_url}
        )
    swapped = misfile_series(hospital, rows, series=4)
    second = [r for r in rows if r["visit"] == "2"]
    service = medreid_with_priors(tmp_path, sqlite_database.url, pacs, **extra)
    service.start(timeout=180)
    try:
        send(service, hospital, second)
        wait_for_queue(sqlite_database.sessions, timeout=300)
        ct_series = {r["series_instance_uid"] for r in second if r["header_modality"] == "CT"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sqlite_database.sessions.begin() as session:
                judged = session.scalar(select(func.count(SeriesVerdictRow.id)))
            if judged == len(ct_series):
                break
            time.sleep(0.5)
    finally:
        if retrieval != "get":
            pacs.stop()
        service.stop()
    first_study = {r["true_patient"]: r["study_instance_uid"] for r in rows if r["visit"] == "1"}
    with sqlite_database.sessions.begin() as session:
        origins = session.execute(
            select(GalleryEntry.origin, func.count()).group_by(GalleryEntry.origin)
        ).all()
        # nothing was enrolled by hand: every reference is a PACS prior, each fetched once
        assert [o for o, _ in origins] == ["pacs_prior"]
        sops = session.scalars(select(GalleryEntry.prior_sop_uid)).all()
        assert len(sops) == len(set(sops)) > 0
        assert {s for s in session.scalars(select(GalleryEntry.prior_study_uid))} <= set(
            first_study.values()
        )
        results = {
            i.sop_instance_uid: r
            for r, i in session.execute(
                select(Result, Instance).join(Instance, Instance.id == Result.instance_id)
            )
        }
        series_judged = session.scalar(select(func.count(SeriesVerdictRow.id)))
        alerts = session.scalars(select(Alert).where(Alert.kind == "patient_mismatch")).all()
        queries = session.scalars(select(AuditEvent).where(AuditEvent.event_code == "110112")).all()
        transfers = [
            t
            for t in session.scalars(select(AuditEvent).where(AuditEvent.event_code == "110104"))
            if t.detail.get("purpose") == "priors"
        ]
    assert len(results) == len(second)
    assert series_judged == len(
        {r["series_instance_uid"] for r in second if r["header_modality"] == "CT"}
    )
    caught = false_alarms = 0
    flagged_series = {a.series_instance_uid for a in alerts}
    for uid in {r["series_instance_uid"] for r in second}:
        members = [r for r in second if r["series_instance_uid"] == uid]
        images_flagged = [
            results[r["sop_instance_uid"]].identity_verdict == "mismatch" for r in members
        ]
        flagged = uid in flagged_series
        if uid in swapped:
            caught += flagged
        else:
            false_alarms += sum(images_flagged)
        for r in members:
            result = results[r["sop_instance_uid"]]
            assert result.identity_verdict != "unverifiable", result.identity_reason
            # judged against the header patient's own first visit, named in the result
            assert [p["study_instance_uid"] for p in result.priors or []] == [
                first_study[r["header_patient"]]
            ]
    print(
        f"\n{retrieval}: {caught}/{len(swapped)} swapped series flagged; "
        f"{false_alarms} false alarms in {len(second)} images"
    )
    assert caught == len(swapped)
    assert false_alarms <= 0.1 * len(second)
    image_alerts = [a for a in alerts if a.scope == "image"]
    assert image_alerts
    for alert in image_alerts:
        # the prior study the image disagrees with, and the patient it resembles
        named = {p["study_instance_uid"] for p in alert.detail["prior_studies"] or []}
        assert named == {first_study[str(alert.patient_id)]}
        assert alert.suspected_patient_id != alert.patient_id  # None: it resembles nobody
    pairs = {(r["header_patient"], r["true_modality"]) for r in second}
    assert len(queries) >= len(pairs)
    node = pacs.dicomweb_url if retrieval == "dicomweb" else f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
    assert all(q.detail["node"] == node and q.patient_id for q in queries)
    assert transfers and all(t.detail["received"] == t.detail["requested"] for t in transfers)
    method = {"get": "C-GET", "move": "C-MOVE", "dicomweb": "WADO-RS"}[retrieval]
    assert {t.detail["method"] for t in transfers} == {method}


@with_orthanc_and_models
def test_orthanc_stopped_in_the_middle_leaves_images_unverifiable_then_judged_once_it_is_back(
    first_visits_in_pacs: tuple[Orthanc, Path, list[dict[str, str]]],
    sqlite_database: Database,
    tmp_path: Path,
) -> None:
    pacs, hospital, rows = first_visits_in_pacs
    swapped = misfile_series(hospital, rows, series=2)
    second = [r for r in rows if r["visit"] == "2"]
    patients = sorted({r["header_patient"] for r in second})
    before = [r for r in second if r["header_patient"] in patients[:3]]
    during = [r for r in second if r["header_patient"] not in patients[:3]]
    service = medreid_with_priors(
        tmp_path,
        sqlite_database.url,
        pacs,
        MEDREID_PRIORS_RETRY_S="1",
        MEDREID_PRIORS_RETRY_MAX_S="2",
        MEDREID_PRIORS_TIMEOUT_S="2",
        MEDREID_PRIORS_BUDGET_S="5",
    )
    service.start(timeout=180)
    sessions = sqlite_database.sessions

    def results_of(rows: list[dict[str, str]]) -> dict[str, Result]:
        uids = [r["sop_instance_uid"] for r in rows]
        with sessions.begin() as session:
            found = session.execute(
                select(Result, Instance)
                .join(Instance, Instance.id == Result.instance_id)
                .where(Instance.sop_instance_uid.in_(uids))
            ).all()
            session.expunge_all()
        return {i.sop_instance_uid: r for r, i in found}

    try:
        send(service, hospital, before)
        wait_for_queue(sessions, timeout=300)
        pacs.stop()
        started = time.monotonic()
        send(service, hospital, during)
        wait_for_queue(sessions, timeout=120)  # the worker neither stops nor hangs
        drained_s = time.monotonic() - started
        assert service.process is not None and service.process.poll() is None
        waiting = results_of(during)
        assert len(waiting) == len(during)
        for result in waiting.values():
            assert result.identity_verdict == "unverifiable" and result.awaiting_priors
            assert (result.identity_reason or "").startswith("priors unavailable: ORTHANC@")
        pacs = Orthanc(
            pacs.workdir,
            medreid_port=free_port(),
            dicom_port=pacs.dicom_port,
            http_port=pacs.http_port,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            judged = results_of(during)
            if not any(r.awaiting_priors for r in judged.values()):
                break
            time.sleep(0.5)
    finally:
        service.stop()
        if pacs is not first_visits_in_pacs[0]:
            pacs.stop()  # the one started again (the fixture stops the first)
    print(f"\nthe second half drained in {drained_s:.1f} s with the PACS down")
    for row in during:
        result = judged[row["sop_instance_uid"]]
        assert not result.awaiting_priors and result.judged_again_at is not None
        assert result.identity_reason is None and result.priors
        expected = "mismatch" if row["series_instance_uid"] in swapped else "consistent"
        if row["true_modality"] == "xray" or row["series_instance_uid"] in swapped:
            assert result.identity_verdict == expected, row
    for result in results_of(before).values():
        assert result.judged_again_at is None and result.identity_verdict != "unverifiable"
    with sessions.begin() as session:
        # nothing processed twice: one job, one attempt, one result per image
        jobs = session.execute(select(Job.attempts)).scalars().all()
        assert len(jobs) == len(second) and set(jobs) == {1}
        assert session.scalar(select(func.count(Result.id))) == len(second)
        states = set(session.scalars(select(PriorFetch.state)))
        assert states == {"fetched"}
        failed_queries = session.scalar(
            select(func.count(AuditEvent.id)).where(
                AuditEvent.event_code == "110112", AuditEvent.outcome == 8
            )
        )
        assert failed_queries and failed_queries > 0


@with_orthanc_and_models
def test_backfill_fills_the_gallery_ahead_of_time_and_fetches_nothing_twice(
    first_visits_in_pacs: tuple[Orthanc, Path, list[dict[str, str]]],
    sqlite_database: Database,
    tmp_path: Path,
) -> None:
    pacs, _hospital, rows = first_visits_in_pacs
    service = medreid_with_priors(tmp_path, sqlite_database.url, pacs)
    one = tmp_path / "patients.txt"
    one.write_text(f"{rows[0]['true_patient']}\n")
    first = json.loads(
        service.cli("priors", "backfill", "--since", "2000-01-01", "--patients", str(one)).stdout
    )
    assert first["patients"] == 1 and first["entries_added"] > 0
    everyone = json.loads(service.cli("priors", "backfill", "--since", "2000-01-01").stdout)
    patients = {r["true_patient"] for r in rows}
    assert everyone["patients"] == len(patients) and everyone["unavailable"] == []
    again = json.loads(service.cli("priors", "backfill", "--since", "2000-01-01").stdout)
    assert again["entries_added"] == 0  # resumed or repeated: nothing held is fetched again
    with sqlite_database.sessions.begin() as session:
        entries = session.execute(
            select(GalleryEntry.patient_id, GalleryEntry.modality, GalleryEntry.prior_sop_uid)
        ).all()
    assert len(entries) == first["entries_added"] + everyone["entries_added"]
    assert {(p, m) for p, m, _ in entries} == {(p, m) for p in patients for m in ("xray", "ct")}
    assert len({sop for _, _, sop in entries}) == len(entries)
    # a window with no study in it finds no patient
    empty = json.loads(
        service.cli("priors", "backfill", "--since", "1990-01-01", "--until", "1990-12-31").stdout
    )
    assert empty["patients"] == 0 and empty["entries_added"] == 0


@with_orthanc_and_models
def test_priors_are_fetched_again_by_reference_for_a_new_model_version(
    first_visits_in_pacs: tuple[Orthanc, Path, list[dict[str, str]]],
    sqlite_database: Database,
    tmp_path: Path,
) -> None:
    from medreid.enrollment import enroll_again
    from tests.test_enrollment import NEW, old_copy

    pacs, _hospital, _rows = first_visits_in_pacs
    models = tmp_path / "models"
    models.mkdir()
    old_copy(MODELS / NEW, models)  # reid-xray-v0 serves
    service = medreid_with_priors(
        tmp_path, sqlite_database.url, pacs, MEDREID_MODELS_DIR=str(models)
    )
    filled = json.loads(
        service.cli("priors", "backfill", "--since", "2000-01-01", "--modality", "xray").stdout
    )
    assert filled["entries_added"] > 0
    settings = load_settings(DEFAULT_CONFIG, env=service.env)
    counts, gone = enroll_again(
        settings, sqlite_database.sessions, "tester", from_model="reid-xray-v0", into=MODELS / NEW
    )
    assert counts == {NEW: filled["entries_added"]} and gone == 0
    with sqlite_database.sessions.begin() as session:
        by_version: dict[str, set[str | None]] = {}
        for version, sop, origin in session.execute(
            select(GalleryEntry.model_version, GalleryEntry.prior_sop_uid, GalleryEntry.origin)
        ):
            assert origin == "pacs_prior"
            by_version.setdefault(version, set()).add(sop)
    # the same priors, fetched again from the PACS (no pixels were kept), under the new model
    assert by_version[NEW] == by_version["reid-xray-v0"] and None not in by_version[NEW]
    pacs.stop()
    pacs.process.wait()
    counts, gone = enroll_again(
        settings, sqlite_database.sessions, "tester", from_model="reid-xray-v0", into=MODELS / NEW
    )
    assert counts.get(NEW, 0) == 0 and gone == filled["entries_added"]  # counted, no crash


def _analysis(verdict: str, header_score: float | None, routed_to: str = "ct") -> Any:
    from pipeline.analysis import Analysis
    from pipeline.verdicts import IdentityDecision, IdentityVerdict, ModalityVerdict

    return Analysis(
        predicted_modality=routed_to,
        modality_scores={routed_to: 1.0},
        modality_verdict=ModalityVerdict.AGREE,
        routed_to=routed_to,
        top_matches=[],
        identity=IdentityDecision(IdentityVerdict(verdict), None, header_score, header_score),
        threshold=0.5,
        versions={"reid:ct": "reid-ct-x"},
    )


def test_the_priors_decide_what_the_gallery_alone_cannot() -> None:
    from medreid.priors import PriorsCheck
    from medreid.worker import with_priors

    held = PriorsCheck(True, studies=[{"study_instance_uid": "1.2"}], modality="ct")
    away = PriorsCheck(False, reason="priors unavailable: PACS@h:104: refused", wait=True)
    nothing = PriorsCheck(True, studies=[], modality="ct")

    def verdict(analysis: Any, check: PriorsCheck) -> str:
        return str(with_priors(analysis, check).identity.verdict)  # type: ignore[union-attr]

    # the header patient's own priors disagree, and nobody else matches: a mismatch
    assert verdict(_analysis("unverifiable", 0.1), held) == "mismatch"
    assert verdict(_analysis("consistent", 0.9), held) == "consistent"
    # no prior study in the PACS: the gallery's verdict stands
    assert verdict(_analysis("new_patient", None), nothing) == "new_patient"
    # not to be had: unverifiable, whatever the gallery said
    assert verdict(_analysis("mismatch", 0.1), away) == "unverifiable"
    # routed by its pixels to another modality's model than its header's: not these priors
    assert verdict(_analysis("unverifiable", 0.1, routed_to="xray"), held) == "unverifiable"
