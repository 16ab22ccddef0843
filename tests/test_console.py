"""The console over a database of known results: authentication, sessions and CSRF, every
filter, the detail page and its thumbnail, the audited CSV export, escaping, headers and logs."""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import ssl
import sys
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from console.app import ConsoleConfig, ConsoleContext, create_app
from console.server import ConsoleServer
from medreid.cli import main
from pipeline.runner import PipelineConfig
from storage.models import AuditEvent, ConsoleSession, Instance, Result
from support.service import free_port
from tests.conftest import Database
from tests.console_fixtures import (
    CSRF,
    PASSWORD,
    Clock,
    Hospital,
    add_console_user,
    console_client,
    fill,
    login,
    page_csrf,
)

pytestmark = pytest.mark.db


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def hospital(database: Database, spool: Path) -> Hospital:
    filled = fill(database, spool)
    add_console_user(database)
    return filled


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(database: Database, spool: Path, clock: Clock, hospital: Hospital) -> TestClient:
    return console_client(database, spool, clock)


def audit_rows(db: Database, **where: str) -> list[AuditEvent]:
    with db.sessions.begin() as session:
        stmt = select(AuditEvent).order_by(AuditEvent.id)
        for column, value in where.items():
            stmt = stmt.where(getattr(AuditEvent, column) == value)
        return list(session.scalars(stmt))


def ids(client: TestClient, **params: str) -> set[int]:
    answer = client.get("/api/v1/results", params=params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["total"] == len(body["items"])
    return {item["id"] for item in body["items"]}


def test_nothing_is_served_without_a_login(client: TestClient) -> None:
    page = client.get("/results", params={"patient": "P1"})
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fresults%3Fpatient%3DP1"
    for path in ("/", "/audit", "/results/1"):
        assert client.get(path).status_code == 303
    for path in ("/api/v1/results", "/api/v1/results/1", "/api/v1/audit.csv", "/api/v1/dashboard"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == "Bearer"
    forged = client.get("/api/v1/results", headers={"Authorization": "Bearer forged"})
    assert forged.status_code == 401
    client.cookies.set("medreid_session", "forged")
    assert client.get("/").status_code == 303
    # what is public: the login form, the style sheet and the API's description
    assert client.get("/login").status_code == 200
    assert client.get("/static/console.css").status_code == 200
    assert client.get("/api/openapi.json").json()["info"]["title"] == "medreid console API"


def test_login_wants_its_csrf_token_the_password_and_locks_after_failures(
    client: TestClient, database: Database
) -> None:
    form = client.get("/login")
    # a form posted from elsewhere: no login-CSRF cookie to match
    stranger = TestClient(client.app, follow_redirects=False)
    forged = stranger.post(
        "/login", data={"username": "admin", "password": PASSWORD, "csrf_token": "x"}
    )
    assert forged.status_code == 403
    assert form.status_code == 200

    assert login(client, password="wrong password!") == 401
    failures = audit_rows(database, event="User Authentication", actor_user="admin")
    assert [(e.outcome, e.detail["reason"]) for e in failures] == [
        (4, "unknown user or wrong password")
    ]
    assert login(client) == 303
    cookie = next(c for c in client.cookies.jar if c.name == "medreid_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert client.get("/").status_code == 200
    assert [e.outcome for e in audit_rows(database, event="User Authentication")] == [4, 0]

    # five failures lock the name from that address, even against the right password
    add_console_user(database, "second")
    other = TestClient(client.app, follow_redirects=False)
    for _ in range(5):
        assert login(other, "second", "not the password") == 401
    form = other.get("/login").text
    token = CSRF.search(form)
    assert token
    locked = other.post(
        "/login", data={"username": "second", "password": PASSWORD, "csrf_token": token.group(1)}
    )
    assert locked.status_code == 401 and "refused for up to 15 minutes" in locked.text
    refused = audit_rows(database, actor_user="second")[-1]
    assert refused.event_type == "Login While Locked"
    assert refused.detail["reason"] == (
        "locked: repeated failures of this user name from this address"
    )


def test_a_lockout_is_per_address_does_not_extend_itself_and_can_be_ended(
    database: Database,
    spool: Path,
    hospital: Hospital,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_console_user(database, "second")
    app = console_client(database, spool, clock).app
    attacker = TestClient(app, follow_redirects=False, client=("203.0.113.7", 40000))
    colleague = TestClient(app, follow_redirects=False, client=("192.0.2.10", 40000))
    for _ in range(5):
        assert login(attacker, "second", "not the password") == 401
    assert login(attacker, "second") == 401  # locked from the attacker's address
    assert login(colleague, "second") == 303  # not from anyone else's

    # knocking all through the lockout does not extend it: it ends when the failures age out
    for _ in range(12):
        clock.advance(minutes=1)
        assert login(attacker, "second") == 401
    clock.advance(minutes=3, seconds=1)
    assert login(attacker, "second") == 303

    # many names from one address lock the address
    sprayer = TestClient(app, follow_redirects=False, client=("198.51.100.3", 40000))
    for index in range(20):
        assert login(sprayer, f"guess{index % 4}", "not the password") == 401
    assert login(sprayer, "admin") == 401
    assert login(colleague, "admin") == 303
    events = audit_rows(database, actor_host="198.51.100.3")
    assert events[-1].detail["reason"] == "locked: repeated failures from this address"

    # `medreid users unlock` ends a lockout at once, and is audited
    for _ in range(5):
        assert login(attacker, "second", "not the password") == 401
    assert login(attacker, "second") == 401
    monkeypatch.setenv("MEDREID_DATABASE_URL", database.url)
    clock.advance(minutes=1)
    assert main(["users", "unlock", "second"], clock=clock) == 0
    assert login(attacker, "second") == 303
    changes = audit_rows(database, event_type="User Security Attributes Changed")
    assert changes[-1].detail["change"] == "unlocked"


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


def test_sessions_end_when_idle_at_their_limit_and_at_logout(
    database: Database, spool: Path, hospital: Hospital, clock: Clock
) -> None:
    config = ConsoleConfig(session_idle=dt.timedelta(minutes=15), session_max=dt.timedelta(hours=1))
    client = console_client(database, spool, clock, config)
    assert login(client) == 303
    clock.advance(minutes=14)
    assert client.get("/").status_code == 200
    clock.advance(minutes=14)  # 14 minutes since the last request: still alive
    assert client.get("/").status_code == 200
    clock.advance(minutes=16)
    assert client.get("/").status_code == 303  # idle too long

    assert login(client) == 303
    for _ in range(5):
        clock.advance(minutes=12)
        client.get("/")
    assert client.get("/").status_code == 303  # an hour after login, however busy

    assert login(client) == 303
    token = page_csrf(client)
    assert client.post("/logout", data={"csrf_token": "not it"}).status_code == 403
    assert client.get("/").status_code == 200
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert client.get("/").status_code == 303
    with database.sessions.begin() as session:
        ended = [s.ended_why for s in session.scalars(select(ConsoleSession))]
    assert ended == ["idle", "expired", "logout"]


def test_users_and_tokens_from_the_command_line(
    database: Database,
    spool: Path,
    hospital: Hospital,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MEDREID_DATABASE_URL", database.url)

    def run(*args: str, stdin: str = "") -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            return main(["users", *args], clock=clock)
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 1

    assert run("add", "auditor", "--password-stdin", stdin="short\n") == 1
    assert "at least 12 characters" in capsys.readouterr().err
    assert run("add", "auditor", "--password-stdin", stdin="a long enough secret\n") == 0
    assert run("add", "auditor", "--password-stdin", stdin="a long enough secret\n") == 1
    assert "exists" in capsys.readouterr().err
    assert run("token", "auditor", "--days", "2") == 0
    token = capsys.readouterr().out.strip()

    client = console_client(database, spool, clock)
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/results", headers=bearer).status_code == 200
    assert audit_rows(database, event="Query")[-1].detail["interface"] == "api"
    assert login(client, "auditor", "a long enough secret") == 303
    clock.advance(days=3)
    assert client.get("/api/v1/results", headers=bearer).status_code == 401  # expired

    assert run("token", "auditor") == 0  # made at the console's time, so valid there
    fresh = {"Authorization": f"Bearer {capsys.readouterr().out.strip()}"}
    assert client.get("/api/v1/dashboard", headers=fresh).status_code == 200
    # a new password ends the tokens and sessions the old one opened
    assert run("password", "auditor", "--password-stdin", stdin="another long secret\n") == 0
    assert client.get("/api/v1/dashboard", headers=fresh).status_code == 401
    assert login(client, "auditor", "a long enough secret") == 401
    assert login(client, "auditor", "another long secret") == 303
    assert client.get("/").status_code == 200
    assert run("disable", "auditor") == 0
    assert client.get("/").status_code == 303
    assert login(client, "auditor", "another long secret") == 401
    changes = [
        e.detail["change"]
        for e in audit_rows(database, event_type=("User Security Attributes Changed"))
    ]
    assert changes == ["added", "api token", "api token", "password", "disabled"]
    assert run("list", "--format", "csv") == 0
    assert "auditor" in capsys.readouterr().out


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


def test_open_redirects_are_refused(client: TestClient) -> None:
    form = client.get("/login", params={"next": "//evil.example/"})
    assert 'name="next" value="/"' in form.text
    match = CSRF.search(form.text)
    assert match
    answer = client.post(
        "/login",
        data={
            "username": "admin",
            "password": PASSWORD,
            "csrf_token": match.group(1),
            "next": "https://evil.example/",
        },
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"


def test_the_console_serves_https_with_a_certificate(
    sqlite_database: Database, tmp_path: Path
) -> None:
    from tests.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    app = create_app(
        ConsoleContext(
            sessions=sqlite_database.sessions,
            spool_root=tmp_path,
            pipeline=PipelineConfig(),
            config=ConsoleConfig(https=True),
        )
    )
    port = free_port()
    server = ConsoleServer(
        app,
        host="127.0.0.1",
        port=port,
        certificate=str(pki.server_cert),
        private_key=str(pki.server_key),
    )
    server.start()
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        answer = httpx.get(f"https://127.0.0.1:{port}/login", verify=trusted)
        assert answer.status_code == 200
        assert answer.headers["strict-transport-security"].startswith("max-age=")
        assert "secure" in answer.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
    finally:
        server.stop()


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
