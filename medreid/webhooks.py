"""Webhooks: each alert, and each review decision, POSTed as JSON to the configured URLs.

A dispatcher thread of `medreid serve` fans the outbox's events out to the URLs, sends what is
due, and closes each delivery as sent, to be retried (the wait doubling from
``webhooks.backoff_s`` to ``webhooks.backoff_max_s``), or given up after
``webhooks.max_attempts``; sent and given-up deliveries are audited. The body holds only the
fields ``webhooks.fields`` names (patient IDs not by default) and is signed: the
``X-Medreid-Signature`` header is ``sha256=`` and the hex HMAC-SHA256 of the body under
``webhooks.secret``. A delivery is sent at least once; ``X-Medreid-Delivery`` lets the receiver
drop a repeat (one sent by a service killed before it could record the send)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from medreid.settings import WebhookSettings
from storage import audit
from storage.audit_trail import append_audit
from storage.models import Alert, AlertEvent, Clock, utcnow
from storage.outbox import (
    ClaimedDelivery,
    claim_deliveries,
    close_delivery,
    event_with_alert,
    fan_out,
)

log = logging.getLogger(__name__)
CHANNEL = "webhook"
SIGNATURE_HEADER = "X-Medreid-Signature"
DELIVERY_HEADER = "X-Medreid-Delivery"
# An answer takes at most timeout_s; a lease this much longer is never outlived by its send.
LEASE_MARGIN_S = 60.0
Post = Callable[[str, bytes, dict[str, str], float], int]


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(event: AlertEvent, alert: Alert, delivery_id: int, fields: tuple[str, ...]) -> bytes:
    """The body: the alert's facts the settings let leave, as compact JSON."""
    everything: dict[str, Any] = {
        "event": event.event,
        "delivery_id": delivery_id,
        "alert_id": alert.id,
        "kind": alert.kind,
        "scope": alert.scope,
        "state": alert.state,
        "raised_at": alert.raised_at,
        "reviewed_at": alert.reviewed_at,
        "reviewed_by": alert.reviewed_by,
        "review_reason": alert.review_reason,
        "header_modality": alert.header_modality,
        "predicted_modality": alert.predicted_modality,
        "study_instance_uid": alert.study_instance_uid,
        "series_instance_uid": alert.series_instance_uid,
        "sop_instance_uid": alert.sop_instance_uid,
        "patient_id": alert.patient_id,
        "suspected_patient_id": alert.suspected_patient_id,
    }
    kept = {k: _plain(everything[k]) for k in fields}
    return json.dumps(kept, separators=(",", ":"), sort_keys=True).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.isoformat()
    return value


def http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """The receiver's HTTP status (a 3xx is not followed: it is not a delivery)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class WebhookDispatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: WebhookSettings,
        name: str,
        *,
        clock: Clock = utcnow,
        post: Post = http_post,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.name = name
        self.clock = clock
        self.post = post
        self.started_at = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def retry_at(self, attempts: int, now: dt.datetime) -> dt.datetime | None:
        """When to try again after ``attempts`` failed tries; None: give up."""
        if attempts >= self.settings.max_attempts:
            return None
        wait = min(self.settings.backoff_s * 2 ** (attempts - 1), self.settings.backoff_max_s)
        return now + dt.timedelta(seconds=wait)

    def run_once(self, limit: int = 50) -> int:
        """Fan out, send what is due; how many deliveries were tried."""
        settings = self.settings
        now = self.clock()
        with self.sessions.begin() as session:
            fan_out(
                session,
                channel=CHANNEL,
                destinations=settings.urls,
                since=self.started_at - dt.timedelta(hours=settings.backlog_h),
                now=now,
            )
        with self.sessions.begin() as session:
            claimed = claim_deliveries(
                session,
                channel=CHANNEL,
                worker=self.name,
                limit=limit,
                lease_s=settings.timeout_s + LEASE_MARGIN_S,
                now=now,
            )
        for delivery in claimed:
            self._send(delivery)
        return len(claimed)

    def _send(self, delivery: ClaimedDelivery) -> None:
        with self.sessions.begin() as session:
            found = event_with_alert(session, event_id=delivery.event_id)
            if found is None:
                return
            event, alert = found
            body = payload(event, alert, delivery.id, self.settings.fields)
            facts = (event.event, alert.id, alert.patient_id, alert.study_instance_uid)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(body, self.settings.secret),
            DELIVERY_HEADER: str(delivery.id),
            "X-Medreid-Event": facts[0],
        }
        error: str | None = None
        try:
            status = self.post(delivery.destination, body, headers, self.settings.timeout_s)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except (OSError, ValueError) as exc:  # refused, reset, timed out, DNS
            error = f"{type(exc).__name__}: {exc}"
        now = self.clock()
        attempts = delivery.attempts + 1
        retry = None if error is None else self.retry_at(attempts, now)
        with self.sessions.begin() as session:
            if not close_delivery(
                session, delivery=delivery, worker=self.name, now=now, error=error, retry_at=retry
            ):
                return
            if error is None or retry is None:
                append_audit(
                    session,
                    record=audit.AuditRecord(
                        kind=audit.WEBHOOK_SENT if error is None else audit.WEBHOOK_GIVEN_UP,
                        outcome=audit.Outcome.SUCCESS
                        if error is None
                        else audit.Outcome.SERIOUS_FAILURE,
                        actor_user=self.name,
                        patient_id=facts[2],
                        study_instance_uid=facts[3],
                        occurred_at=now,
                        detail={
                            "delivery_id": delivery.id,
                            "event": facts[0],
                            "alert_id": facts[1],
                            "destination": delivery.destination,
                            "attempts": attempts,
                            "error": error,
                        },
                    ),
                )
        if error is not None:
            log.warning(
                "webhook delivery %d to %s failed (attempt %d): %s%s",
                delivery.id,
                delivery.destination,
                attempts,
                error,
                "; given up" if retry is None else "",
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medreid-webhooks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except SQLAlchemyError as exc:
                log.error("webhooks: database error, retrying: %s", exc)
                busy = 0
            if not busy:
                self._stop.wait(self.settings.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout_s + 5)
