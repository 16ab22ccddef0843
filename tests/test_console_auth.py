"""The console's doors: logins with CSRF tokens and lockouts, sessions and their ends, users
and tokens from the command line, redirects kept on the site, HTTPS."""

from __future__ import annotations

import datetime as dt
import io
import ssl
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from console.app import ConsoleConfig, ConsoleContext, create_app
from console.server import ConsoleServer
from medreid.cli import main
from pipeline.runner import PipelineConfig
from storage.models import ConsoleSession
from support.service import free_port
from tests.conftest import Database
from tests.console_fixtures import (
    CSRF,
    PASSWORD,
    Clock,
    Hospital,
    add_console_user,
    audit_rows,
    console_client,
    login,
    page_csrf,
)

pytestmark = pytest.mark.db


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
