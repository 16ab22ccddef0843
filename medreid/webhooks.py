"""Webhooks: each alert, and each review decision, POSTed as JSON to ``webhooks.urls``
through the outbox (``medreid.outbox``).

The body holds only the fields ``webhooks.fields`` names (patient IDs not by default) and is
signed: the ``X-Medreid-Signature`` header is ``sha256=`` and the hex HMAC-SHA256 of the body
under ``webhooks.secret``. ``X-Medreid-Delivery`` lets the receiver drop a repeat."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from medreid.outbox import DeliveryFailed
from medreid.outbox_settings import WebhookSettings
from storage import audit
from storage.models import Alert, AlertEvent
from storage.outbox import ClaimedDelivery

SIGNATURE_HEADER = "X-Medreid-Signature"
DELIVERY_HEADER = "X-Medreid-Delivery"
Post = Callable[[str, bytes, dict[str, str], float], int]


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(event: AlertEvent, alert: Alert, delivery_id: int, fields: Sequence[str]) -> bytes:
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
    """The receiver's HTTP status."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass
class WebhookChannel:
    settings: WebhookSettings
    post: Post = http_post
    name: str = "webhook"
    events: Sequence[str] | None = None  # every alert and every decision
    alert_state: str | None = None
    alert_kind: str | None = None
    sent: audit.EventKind = audit.WEBHOOK_SENT
    given_up: audit.EventKind = audit.WEBHOOK_GIVEN_UP

    @property
    def destinations(self) -> Sequence[str]:
        return self.settings.urls

    @property
    def timeout_s(self) -> float:
        return self.settings.timeout_s

    def prepare(
        self, session: Session, delivery: ClaimedDelivery, event: AlertEvent, alert: Alert
    ) -> tuple[bytes, dict[str, str]]:
        body = payload(event, alert, delivery.id, self.settings.fields)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(body, self.settings.secret),
            DELIVERY_HEADER: str(delivery.id),
            "X-Medreid-Event": event.event,
        }
        return body, headers

    def send(self, destination: str, message: tuple[bytes, dict[str, str]]) -> None:
        body, headers = message
        status = self.post(destination, body, headers, self.settings.timeout_s)
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}")
