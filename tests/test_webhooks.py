"""Webhooks through the outbox: each alert and each decision POSTed once accepted, signed with
HMAC-SHA256, patient IDs left out unless configured; a refusing receiver is retried with
backoff and a hopeless one given up, both audited; a dead dispatcher's deliveries are taken
over once their lease runs out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from medreid.outbox import OutboxDispatcher
from medreid.settings import (
    OutboxSettings,
    SettingsError,
    WebhookSettings,
    describe,
    load_settings,
)
from medreid.webhooks import WebhookChannel
from storage.alerts import review_alert
from storage.models import Alert, AlertState, AuditEvent, Delivery
from tests.conftest import Database
from tests.test_alerts import BOTH, SWAPPED, finished

pytestmark = pytest.mark.db
SECRET = "a shared secret of the hospital"


class Receiver:
    """An HTTP endpoint that answers each POST with the next status of ``script`` (then 200)
    and keeps what it accepted."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.tries = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.tries += 1
                status = receiver.script.pop(0) if receiver.script else 200
                if status == 200:
                    receiver.accepted.append((dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/medreid"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made: list[Receiver] = []

    def factory(script: list[int]) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield factory  # type: ignore[misc]
    for r in made:
        r.close()


def dispatcher_for(
    database: Database, *urls: str, name: str = "test/outbox", clock: Any = None, **changes: Any
) -> OutboxDispatcher:
    """A dispatcher of webhooks to ``urls``; ``changes`` to the webhook or outbox settings."""
    hook_keys = {f.name for f in dataclasses.fields(WebhookSettings)}
    hooks = WebhookSettings(urls=urls, secret=SECRET)
    outbox = OutboxSettings(backoff_s=0.0)
    hooks = dataclasses.replace(hooks, **{k: v for k, v in changes.items() if k in hook_keys})
    outbox = dataclasses.replace(outbox, **{k: v for k, v in changes.items() if k not in hook_keys})
    extra = {"clock": clock} if clock is not None else {}
    return OutboxDispatcher(database.sessions, outbox, [WebhookChannel(hooks)], name, **extra)


def drain(dispatcher: OutboxDispatcher, rounds: int = 20) -> None:
    for _ in range(rounds):
        if not dispatcher.run_once():
            return


def test_every_alert_and_decision_is_delivered_once_signed_and_without_patient_ids(
    database: Database, receiver: Any
) -> None:
    with database.sessions.begin() as session:
        finished(session, "1.1", SWAPPED)
        finished(session, "1.2", BOTH, patient="P2")
        first = session.scalars(select(Alert).order_by(Alert.id)).first()
        assert first is not None
        review_alert(
            session, alert_id=first.id, decision=AlertState.CONFIRMED, reviewer="qa", reason="x"
        )
    hook = receiver([503, 503])  # refuses twice, then takes everything
    dispatcher = dispatcher_for(database, hook.url)
    drain(dispatcher)
    bodies = [json.loads(body) for _, body in hook.accepted]
    # three alerts raised (a swap; a swap with a wrong tag) and one decision
    assert sorted(b["event"] for b in bodies) == ["alert.raised"] * 3 + ["alert.reviewed"]
    assert len({b["delivery_id"] for b in bodies}) == 4 and hook.tries == 6
    for headers, body in hook.accepted:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Medreid-Signature"], expected)
        assert headers["X-Medreid-Delivery"] == str(json.loads(body)["delivery_id"])
        assert "patient_id" not in json.loads(body) and b"P9" not in body
    reviewed = next(b for b in bodies if b["event"] == "alert.reviewed")
    assert (reviewed["state"], reviewed["reviewed_by"]) == ("confirmed", "qa")
    drain(dispatcher)
    assert len(hook.accepted) == 4  # nothing sent twice
    with database.sessions.begin() as session:
        assert {d.state for d in session.scalars(select(Delivery))} == {"sent"}
        sent = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "Webhook Sent"))
        attempts = [e.detail["attempts"] for e in sent]
        assert len(attempts) == 4 and sum(attempts) == hook.tries  # each refusal retried


def test_patient_ids_leave_only_when_listed(database: Database, receiver: Any) -> None:
    with database.sessions.begin() as session:
        finished(session, "2.1", SWAPPED)
    hook = receiver([])
    fields = ("event", "alert_id", "patient_id", "suspected_patient_id")
    dispatcher = dispatcher_for(database, hook.url, fields=fields)
    drain(dispatcher)
    ((_, body),) = hook.accepted
    assert json.loads(body) == {
        "event": "alert.raised",
        "alert_id": json.loads(body)["alert_id"],
        "patient_id": "P1",
        "suspected_patient_id": "P9",
    }


def test_a_receiver_that_never_accepts_is_given_up_after_its_retries(
    database: Database, receiver: Any
) -> None:
    with database.sessions.begin() as session:
        finished(session, "3.1", SWAPPED)
    hook = receiver([500] * 10)
    dispatcher = dispatcher_for(database, hook.url, max_attempts=3)
    drain(dispatcher)
    assert hook.tries == 3 and hook.accepted == []
    with database.sessions.begin() as session:
        (delivery,) = session.scalars(select(Delivery)).all()
        assert (delivery.state, delivery.attempts, delivery.last_error) == (
            "given_up",
            3,
            "HTTP 500",
        )
        (given_up,) = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "Webhook Given Up")
        ).all()
        assert given_up.outcome == 8 and given_up.detail["destination"] == hook.url


def test_the_wait_between_tries_doubles_up_to_its_cap(database: Database) -> None:
    dispatcher = dispatcher_for(
        database, "http://127.0.0.1:9/", backoff_s=5.0, backoff_max_s=30.0, max_attempts=6
    )
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    waits = [dispatcher.retry_at(n, now) for n in range(1, 7)]
    assert [(w - now).total_seconds() for w in waits[:5] if w] == [5, 10, 20, 30, 30]
    assert waits[5] is None


def test_a_dead_dispatchers_deliveries_are_taken_over_after_their_lease(
    database: Database, receiver: Any
) -> None:
    with database.sessions.begin() as session:
        finished(session, "4.1", SWAPPED)
    hook = receiver([])
    clock = [dt.datetime.now(dt.UTC)]
    dead = dispatcher_for(database, hook.url, name="host-a/outbox", clock=lambda: clock[0])
    dead._deliver = lambda channel, delivery: None  # type: ignore[method-assign]
    assert dead.run_once() == 1
    after = dispatcher_for(database, hook.url, name="host-b/outbox", clock=lambda: clock[0])
    assert after.run_once() == 0  # still leased to the dead one
    clock[0] += dt.timedelta(minutes=5)
    assert after.run_once() == 1
    assert len(hook.accepted) == 1


def test_a_restarted_node_takes_back_its_own_leases_at_once_and_no_one_elses(
    database: Database, receiver: Any
) -> None:
    from storage.outbox import release_deliveries_of

    with database.sessions.begin() as session:
        finished(session, "4.2", SWAPPED)
        finished(session, "4.3", SWAPPED)
    hook = receiver([])
    now = dt.datetime.now(dt.UTC)
    for name in ("host-a:104/outbox", "host-b:104/outbox"):
        killed = dispatcher_for(database, hook.url, name=name, clock=lambda: now)
        killed._deliver = lambda channel, delivery: None  # type: ignore[method-assign]
        assert killed.run_once(limit=1) == 1
    with database.sessions.begin() as session:
        assert release_deliveries_of(session, claimant_prefix="host-a:104/") == 1
    restarted = dispatcher_for(database, hook.url, name="host-a:104/outbox", clock=lambda: now)
    # the restarted node's message goes out now; host-b's stays leased to host-b
    assert restarted.run_once() == 1
    assert len(hook.accepted) == 1 and restarted.run_once() == 0


def test_webhook_settings_fail_naming_the_key_and_the_secret_is_never_shown() -> None:
    base = {"MEDREID_WEBHOOKS_URLS": "https://hooks.example/medreid"}
    with pytest.raises(SettingsError, match=r"webhooks\.secret"):
        load_settings(None, env=base)
    with pytest.raises(SettingsError, match=r"webhooks\.urls"):
        load_settings(
            None, env={"MEDREID_WEBHOOKS_URLS": "ftp://x", "MEDREID_WEBHOOKS_SECRET": SECRET}
        )
    with pytest.raises(SettingsError, match=r"webhooks\.fields: unknown password"):
        load_settings(
            None,
            env={
                **base,
                "MEDREID_WEBHOOKS_SECRET": SECRET,
                "MEDREID_WEBHOOKS_FIELDS": "event,password",
            },
        )
    shown = dict(describe(load_settings(None, env={**base, "MEDREID_WEBHOOKS_SECRET": SECRET})))
    assert shown["webhooks.secret"] == "***"
