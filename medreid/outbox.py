"""The outbox's dispatcher: a thread of `medreid serve` that fans alert events out to each
channel's destinations (webhooks, DICOM reports), sends what is due, and closes each
delivery as sent, to be retried (the wait doubling from ``outbox.backoff_s`` to
``outbox.backoff_max_s``), or given up after ``outbox.max_attempts``. Sent and given-up
deliveries are audited. A delivery is sent at least once: a service killed between sending
and recording sends it again once its lease runs out, as the same message."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from medreid.outbox_settings import OutboxSettings
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
# A send takes at most its channel's timeout; a lease this much longer is never outlived.
LEASE_MARGIN_S = 60.0


class DeliveryFailed(Exception):
    """A send that did not arrive; the message says why, for the row and the log."""


class Channel(Protocol):
    """One way out: where to, which events, and how a message is made and sent."""

    name: str  # the deliveries' channel
    events: Sequence[str] | None  # None: every event
    alert_state: str | None  # only alerts in this state, where given
    alert_kind: str | None  # only alerts of this kind, where given
    sent: audit.EventKind
    given_up: audit.EventKind

    @property
    def destinations(self) -> Sequence[str]: ...

    @property
    def timeout_s(self) -> float: ...

    def prepare(
        self, session: Session, delivery: ClaimedDelivery, event: AlertEvent, alert: Alert
    ) -> Any:
        """The message, made inside the delivery's read transaction."""

    def send(self, destination: str, message: Any) -> None:
        """Raises DeliveryFailed (or OSError) where it did not arrive."""


class OutboxDispatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: OutboxSettings,
        channels: Sequence[Channel],
        name: str,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.channels = list(channels)
        self.name = name
        self.clock = clock
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
        tried = 0
        for channel in self.channels:
            now = self.clock()
            with self.sessions.begin() as session:
                fan_out(
                    session,
                    channel=channel.name,
                    destinations=channel.destinations,
                    since=self.started_at - dt.timedelta(hours=self.settings.backlog_h),
                    now=now,
                    events=channel.events,
                    alert_state=channel.alert_state,
                    alert_kind=channel.alert_kind,
                )
            with self.sessions.begin() as session:
                claimed = claim_deliveries(
                    session,
                    channel=channel.name,
                    worker=self.name,
                    limit=limit,
                    lease_s=channel.timeout_s + LEASE_MARGIN_S,
                    now=now,
                )
            for delivery in claimed:
                self._deliver(channel, delivery)
            tried += len(claimed)
        return tried

    def _deliver(self, channel: Channel, delivery: ClaimedDelivery) -> None:
        error: str | None = None
        message: Any = None
        with self.sessions.begin() as session:
            found = event_with_alert(session, event_id=delivery.event_id)
            if found is None:
                return
            event, alert = found
            facts = (event.event, alert.id, alert.patient_id, alert.study_instance_uid)
            try:
                message = channel.prepare(session, delivery, event, alert)
            except DeliveryFailed as exc:  # nothing to make it from (say, a spool file gone)
                error = str(exc)
        if error is None:
            try:
                channel.send(delivery.destination, message)
            except DeliveryFailed as exc:
                error = str(exc)
            except (OSError, ValueError) as exc:  # refused, reset, timed out, unresolvable
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
                        kind=channel.sent if error is None else channel.given_up,
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
                "%s delivery %d to %s failed (attempt %d): %s%s",
                channel.name,
                delivery.id,
                delivery.destination,
                attempts,
                error,
                "; given up" if retry is None else "",
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medreid-outbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except SQLAlchemyError as exc:
                log.error("outbox: database error, retrying: %s", exc)
                busy = 0
            if not busy:
                self._stop.wait(self.settings.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            longest = max((c.timeout_s for c in self.channels), default=0.0)
            self._thread.join(timeout=longest + 5)
