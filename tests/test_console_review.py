"""The review worklist in the console and its API: open alerts first, one alert beside the
images it was judged against, decisions by reviewers only (a viewer gets 403), every look and
decision audited."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Database
from tests.console_fixtures import (
    CSRF,
    PASSWORD,
    Clock,
    Hospital,
    add_console_user,
    api_token,
    audit_rows,
    console_client,
    login,
)

pytestmark = pytest.mark.db


def alerts(client: TestClient, **params: str) -> Any:
    answer = client.get("/api/v1/alerts", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_worklist_lists_open_alerts_first_with_their_counts(
    client: TestClient, hospital: Hospital
) -> None:
    assert login(client) == 303
    page = alerts(client)
    # the swapped image, the wrong Modality tag, the swapped series
    assert page["total"] == 3 and page["counts"] == {"open": 3}
    kinds = sorted((a["scope"], a["kind"]) for a in page["items"])
    assert kinds == [
        ("image", "modality_mismatch"),
        ("image", "patient_mismatch"),
        ("series", "patient_mismatch"),
    ]
    swap = next(a for a in page["items"] if a["result_id"] == hospital.results["swap"])
    assert (swap["patient_id"], swap["suspected_patient_id"]) == ("P2", "P3")
    only = alerts(client, kind="modality_mismatch")
    assert [a["header_modality"] for a in only["items"]] == ["DX"]
    html = client.get("/alerts").text
    assert 'id="count-open">3<' in html and "/alerts/" in html
    detail = client.get(f"/alerts/{swap['id']}").text
    assert 'id="suspected-patient">P3<' in detail
    # the margin the model judged by, where it has one (the swapped image's, 0.25)
    assert "scores 0.250 or more above the header patient's own" in detail
    assert "data:image/png;base64," in detail  # the flagged image, to compare
    assert 'id="viewer-note"' in detail and 'id="review"' not in detail  # a viewer looks


def test_an_alert_on_a_patient_not_enrolled_says_what_the_threshold_was(
    client: TestClient, hospital: Hospital, database: Database
) -> None:
    from storage.models import Alert

    assert login(client) == 303
    swap = next(a for a in alerts(client)["items"] if a["result_id"] == hospital.results["swap"])
    with database.sessions.begin() as session:
        alert = session.get(Alert, swap["id"])
        assert alert is not None
        alert.detail = {**alert.detail, "header_score": None}
    detail = client.get(f"/alerts/{swap['id']}").text
    assert "The header patient is not enrolled" in detail
    assert "at or above the threshold 0.62" in detail
    assert "own score None" not in detail and "or more above the header patient" not in detail


def test_a_viewer_is_refused_every_decision(
    client: TestClient, hospital: Hospital, database: Database
) -> None:
    assert login(client) == 303
    first = alerts(client)["items"][0]["id"]
    csrf = CSRF.search(client.get(f"/alerts/{first}").text)
    assert csrf
    form = {"csrf_token": csrf.group(1), "decision": "confirmed", "reason": ""}
    assert client.post(f"/alerts/{first}/review", data=form).status_code == 403
    token = api_token(database, "admin")
    bearer = {"Authorization": f"Bearer {token}"}
    refused = client.post(
        f"/api/v1/alerts/{first}/review", json={"decision": "confirmed"}, headers=bearer
    )
    assert refused.status_code == 403 and "reviewers decide" in refused.json()["detail"]
    assert alerts(client)["counts"] == {"open": 3}
    assert audit_rows(database, event_type="Alert Reviewed") == []


def test_a_reviewer_confirms_on_the_page_and_dismisses_through_the_api(
    database: Database, spool: object, clock: Clock, hospital: Hospital
) -> None:
    add_console_user(database, "qa", PASSWORD, role="reviewer")
    client = console_client(database, spool, clock)  # type: ignore[arg-type]
    assert login(client, "qa") == 303
    first, second, third = (a["id"] for a in alerts(client)["items"])
    page = client.get(f"/alerts/{first}").text
    assert 'id="review"' in page
    csrf = CSRF.search(page)
    assert csrf
    forged = {"csrf_token": "x" * 32, "decision": "confirmed", "reason": ""}
    assert client.post(f"/alerts/{first}/review", data=forged).status_code == 403
    form = {"csrf_token": csrf.group(1), "decision": "confirmed", "reason": "misfiled at CT"}
    answer = client.post(f"/alerts/{first}/review", data=form)
    assert answer.status_code == 303 and answer.headers["location"] == f"/alerts/{first}"
    assert "confirmed by qa" in client.get(f"/alerts/{first}").text
    again = client.post(f"/alerts/{first}/review", data={**form, "decision": "dismissed"})
    assert again.status_code == 409
    # the API takes a bearer token for decisions, not the browser's cookie
    cookie_only = client.post(f"/api/v1/alerts/{second}/review", json={"decision": "confirmed"})
    assert cookie_only.status_code == 403
    bearer = {"Authorization": f"Bearer {api_token(database, 'qa')}"}
    no_reason = client.post(
        f"/api/v1/alerts/{second}/review", json={"decision": "dismissed"}, headers=bearer
    )
    assert no_reason.status_code == 422
    dismissed = client.post(
        f"/api/v1/alerts/{second}/review",
        json={"decision": "dismissed", "reason": "same patient, new scanner"},
        headers=bearer,
    )
    assert dismissed.status_code == 200, dismissed.text
    assert (dismissed.json()["state"], dismissed.json()["reviewed_by"]) == ("dismissed", "qa")
    assert (
        client.post(
            "/api/v1/alerts/999999/review", json={"decision": "confirmed"}, headers=bearer
        ).status_code
        == 404
    )
    page_after = alerts(client, state="all")
    assert page_after["counts"] == {"open": 1, "confirmed": 1, "dismissed": 1}
    assert page_after["items"][0]["id"] == third  # open first
    decisions = audit_rows(database, event_type="Alert Reviewed")
    assert [
        (e.detail["alert_id"], e.detail["decision"], e.detail["interface"]) for e in decisions
    ] == [
        (first, "confirmed", "console"),
        (second, "dismissed", "api"),
    ]
    assert all(e.actor_user == "qa" for e in decisions)
