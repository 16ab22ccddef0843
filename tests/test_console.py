"""The console over a database of known results: every filter, the detail page and its
thumbnail, the audited CSV export, escaping, headers and logs (its doors: test_console_auth)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from storage.models import Alert, Instance, Result
from tests.conftest import Database
from tests.console_fixtures import (
    Hospital,
    audit_rows,
    login,
)

pytestmark = pytest.mark.db


def ids(client: TestClient, **params: str) -> set[int]:
    answer = client.get("/api/v1/results", params=params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["total"] == len(body["items"])
    return {item["id"] for item in body["items"]}


def test_every_filter_of_the_result_list(client: TestClient, hospital: Hospital) -> None:
    r = hospital.results
    assert login(client) == 303
    assert ids(client) == set(r.values())
    assert ids(client, verdict="mismatch") == {r["swap"], r["wrong"]}
    assert ids(client, verdict="new_patient") == {r["script"]}
    assert ids(client, modality="DX") == {r["wrong"], r["script"]}
    assert ids(client, ae="CT1") == {r["ok"], r["swap"]}
    assert ids(client, patient="P3") == {r["swap"]}  # the matched patient counts too
    assert ids(client, patient="P2") == {r["swap"]}
    assert ids(client, study="1.2.826.4") == {r["broken"]}
    assert ids(client, status="failed") == {r["broken"]}
    assert ids(client, received_from="2026-11-25", received_to="2026-11-25") == {r["broken"]}
    assert ids(client, received_to="2026-11-20") == {r["ok"]}
    assert ids(client, verdict="mismatch", ae="XR2") == {r["wrong"]}
    # what is typed into a filter is a value, never SQL
    assert ids(client, patient="' OR '1'='1") == set()
    assert client.get("/api/v1/results", params={"verdict": "bogus"}).status_code == 422
    # one value a parameter, as described
    twice = client.get("/api/v1/results?patient=P1&patient=P2")
    assert twice.status_code == 422 and twice.json()["detail"][0]["loc"] == ["query", "patient"]
    # a day is YYYY-MM-DD, not a number read as seconds since 1970
    for bad_day in ("0", "20261126", "2026-11-26T10:00"):
        refused = client.get("/api/v1/results", params={"received_to": bad_day})
        assert refused.status_code == 422, bad_day
        assert client.get("/api/v1/audit", params={"until": bad_day}).status_code == 422
    page = client.get("/api/v1/results", params={"limit": 2, "offset": 2}).json()
    assert (page["total"], len(page["items"])) == (5, 2)
    # newest first
    newest = client.get("/api/v1/results", params={"limit": 1}).json()["items"][0]
    assert newest["id"] == max(r.values())

    html = client.get("/results", params={"verdict": "mismatch", "modality": ""}).text
    assert "2 results" in html
    assert f'href="/results/{r["swap"]}"' in html and f'href="/results/{r["wrong"]}"' in html
    assert f'href="/results/{r["ok"]}"' not in html
    invalid = client.get("/results", params={"received_from": "yesterday"})
    assert invalid.status_code == 422 and "received_from" in invalid.text


def test_result_views_and_exports_are_audited_with_the_user(
    client: TestClient, database: Database, hospital: Hospital
) -> None:
    assert login(client) == 303
    client.get("/results", params={"verdict": "mismatch", "patient": "P2"})
    client.get(f"/results/{hospital.results['swap']}")
    export = client.get("/api/v1/audit.csv", params={"event": "Query"})
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    assert "attachment" in export.headers["content-disposition"]

    queries = audit_rows(database, event="Query", actor_user="admin")
    assert queries[-1].detail["filters"] == {"verdict": "mismatch", "patient": "P2"}
    assert queries[-1].patient_id == "P2"
    assert queries[-1].detail["interface"] == "console"
    viewed = audit_rows(database, event_type="Result Viewed")
    assert [(e.actor_user, e.patient_id, e.detail["result_id"]) for e in viewed] == [
        ("admin", "P2", hospital.results["swap"])
    ]
    exported = audit_rows(database, event="Audit Log Used")[-1]
    assert (exported.actor_user, exported.detail["export"]) == ("admin", "csv")

    mine = client.get("/api/v1/audit", params={"user": "admin"}).json()["items"]
    assert mine and {e["actor_user"] for e in mine} == {"admin"}
    rows = list(csv.DictReader(io.StringIO(export.text)))
    # The export holds the query made before it, newest first, with its user.
    assert rows[0]["event"] == "Query" and rows[0]["actor_user"] == "admin"
    assert '"patient":"P2"' in rows[0]["detail"]


def test_the_series_verdicts_and_their_filters(client: TestClient, database: Database) -> None:
    assert login(client) == 303

    def patients(**params: str) -> list[str | None]:
        page = client.get("/api/v1/series", params=params).json()
        assert page["total"] == len(page["items"])
        return [s["patient_id"] for s in page["items"]]

    assert patients() == ["P2", "P1"]  # newest decision first
    assert patients(verdict="mismatch") == ["P2"]
    assert patients(patient="P3") == ["P2"]  # the matched patient counts too
    assert patients(study="1.2.826.1") == ["P1"]
    assert patients(decided_from="2026-11-21") == ["P2"]
    html = client.get("/series", params={"verdict": "mismatch", "patient": ""}).text
    assert "1 series" in html and "P3" in html
    last = audit_rows(database, event="Query")[-1]
    assert (last.actor_user, last.detail["page"]) == ("admin", "series")


def test_the_detail_page_shows_what_the_pipeline_found(
    client: TestClient, hospital: Hospital
) -> None:
    assert login(client) == 303
    page = client.get(f"/results/{hospital.results['swap']}")
    assert page.status_code == 200
    text = page.text
    for expected in (
        "patient mismatch",
        "P3",
        "0.620",
        "0.300",
        "another patient this far above",  # the model's margin, 0.250
        "0.250",
        "compa-v1",
        "reid-ct-v1",
        "1.2.826.2",
        "CT1 at 10.1.2.3",
        "COMPA probabilities",
        "models",
    ):
        assert expected in text, expected
    assert 'src="data:image/png;base64,' in text

    png = client.get(f"/api/v1/results/{hospital.results['swap']}/thumbnail.png")
    assert png.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    assert image.shape == (96, 80)  # smaller than the thumbnail edge: kept as it is
    assert image.std() > 10  # an enhanced image, not a blank

    swap = client.get(f"/api/v1/results/{hospital.results['swap']}").json()
    assert (swap["identity_threshold"], swap["identity_margin"]) == (0.62, 0.25)
    detail = client.get(f"/api/v1/results/{hospital.results['broken']}").json()
    assert detail["status"] == "failed" and detail["failed_stage"] == "decode"
    assert detail["top_matches"] == [] and detail["timings_ms"] == {"read": 1.0, "decode": 2.0}
    assert client.get("/results/999999").status_code == 404
    assert client.get("/api/v1/results/999999").status_code == 404
    assert client.get("/api/v1/results/0").status_code == 422


def test_what_senders_wrote_is_escaped_everywhere(client: TestClient, hospital: Hospital) -> None:
    assert login(client) == 303
    for path in ("/results", f"/results/{hospital.results['script']}", "/audit"):
        client.get("/results", params={"patient": "<script>alert(1)</script>"})
        text = client.get(path).text
        assert "<script>" not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path


def test_the_dashboard_counts_today_the_week_alerts_and_the_queue(
    client: TestClient, hospital: Hospital
) -> None:
    assert login(client) == 303
    board = client.get("/api/v1/dashboard").json()
    # NOW is Thursday 2026-11-26 12:00 UTC; the server's zone decides where "today" begins.
    # Since Monday the 23rd: all but the result of Friday the 20th, the waiting instance too.
    assert board["week"]["total"] == 5
    assert board["week"]["by_sender"] == {"CT1": 2, "XR2": 2, "MR3": 1}
    assert board["today"]["by_modality"]["CT"] == 2
    assert board["open_alerts"] == {"images": 2, "series": 1}
    assert board["queue"] == {"pending": 1, "running": 0, "failed_last_7_days": 1}
    assert board["models_in_use"] == {"compa": "compa-v1", "reid:ct": "reid-ct-v1"}
    hours = board["arrivals_by_hour"]
    assert len(hours) == 48 and sum(h["instances"] for h in hours) == 5  # all but the 6-day one
    rates = {s["calling_ae"]: (s["results"], s["mismatches"]) for s in board["mismatch_by_sender"]}
    assert rates == {"CT1": (2, 1), "XR2": (2, 1)}  # the failed MR3 result is not a verdict

    html = client.get("/").text
    assert 'id="open-alerts">2<' in html and 'id="queue-depth">1<' in html
    assert html.count("<svg") == 2 and "1/2 (50.0%)" in html


def test_headers_and_a_log_without_patient_ids(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert login(client) == 303
    with caplog.at_level(logging.DEBUG):
        page = client.get("/results", params={"patient": "PID-7Q3X9"})
        client.get("/api/v1/results", params={"patient": "PID-7Q3X9"})
        client.get("/api/v1/audit.csv", params={"patient": "PID-7Q3X9"})
    # Everything the server side logged (httpx here is the test's own client).
    served = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
    assert served and not any("PID-7Q3X9" in message for message in served)
    assert any(message.startswith("GET /results -> 200") for message in served)
    headers = page.headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert "server" not in headers or "uvicorn" not in headers["server"]


def test_no_filesystem_path_in_any_response(
    client: TestClient, hospital: Hospital, spool: Path, database: Database
) -> None:
    assert login(client) == 303
    result_id = hospital.results["ok"]
    with database.sessions.begin() as session:
        instance = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert instance is not None
        (spool / instance.spool_path).unlink()  # the image gone from the spool
    with database.sessions.begin() as session:
        ids = [r for (r,) in session.execute(select(Result.id))]
    answers = [client.get(f"/api/v1/results/{r}/thumbnail.png") for r in ids]
    answers += [client.get(f"/results/{r}") for r in ids]
    answers += [client.get(f"/api/v1/results/{result_id}")]
    assert any(a.status_code == 404 for a in answers)
    roots = {str(spool), str(spool.resolve()), str(spool.parent)}
    for answer in answers:
        assert not any(root in answer.text for root in roots), answer.text


def test_the_detail_page_names_the_pacs_priors_and_why_an_image_waits(
    client: TestClient, hospital: Hospital, database: Database
) -> None:
    from sqlalchemy import update

    prior = {"study_instance_uid": "1.2.826.77", "study_date": "20240105", "node": "PACS@h:104"}
    with database.sessions.begin() as session:
        session.execute(
            update(Result)
            .where(Result.id == hospital.results["swap"])
            .values(priors=[{**prior, "images": 3}])
        )
        session.execute(
            update(Result)
            .where(Result.id == hospital.results["ok"])
            .values(
                identity_verdict="unverifiable",
                identity_reason="priors unavailable: PACS@h:104: association refused",
                awaiting_priors=True,
            )
        )
    assert login(client) == 303
    judged = client.get(f"/results/{hospital.results['swap']}").text
    assert 'id="prior-studies"' in judged and "1.2.826.77" in judged and "20240105" in judged
    waiting = client.get(f"/results/{hospital.results['ok']}").text
    assert "priors unavailable: PACS@h:104: association refused" in waiting
    assert "judged again when they can be had" in waiting
    detail = client.get(f"/api/v1/results/{hospital.results['swap']}").json()
    assert detail["prior_studies"] == [{**prior, "images": 3}]
    assert detail["awaiting_priors"] is False and detail["identity_reason"] is None
    # the alert names the prior study the image disagrees with
    with database.sessions.begin() as session:
        alert = session.scalars(
            select(Alert).where(Alert.result_id == hospital.results["swap"])
        ).one()
        alert.detail = {**alert.detail, "prior_studies": [prior]}
        alert_id = alert.id
    page = client.get(f"/alerts/{alert_id}").text
    assert 'id="prior-studies"' in page and "1.2.826.77" in page and "PACS@h:104" in page
