"""The outbox: alert events fanned out to their destinations as deliveries, claimed under a
lease, and closed as sent or given up after their retries. The rows survive restarts; a
delivery whose sender died is claimed again once its lease runs out (so a receiver may see
it twice, and deduplicates by its delivery id)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from storage.models import Alert, AlertEvent, Delivery, DeliveryState


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    event_id: int
    destination: str
    attempts: int  # before this one


def fan_out(
    session: Session,
    *,
    channel: str,
    destinations: Sequence[str],
    since: dt.datetime,
    now: dt.datetime,
    events: Sequence[str] | None = None,
    alert_state: str | None = None,
    alert_kind: str | None = None,
    limit: int = 500,
) -> int:
    """A pending delivery for each event since ``since`` that a destination lacks; only of
    ``events``, and of alerts in ``alert_state`` and of ``alert_kind``, where given."""
    made = 0
    for destination in destinations:
        has_one = exists().where(
            Delivery.event_id == AlertEvent.id,
            Delivery.channel == channel,
            Delivery.destination == destination,
        )
        wanted = select(AlertEvent.id).where(AlertEvent.occurred_at >= since, ~has_one)
        if events is not None:
            wanted = wanted.where(AlertEvent.event.in_(list(events)))
        if alert_state is not None or alert_kind is not None:
            wanted = wanted.join(Alert, Alert.id == AlertEvent.alert_id)
        if alert_state is not None:
            wanted = wanted.where(Alert.state == alert_state)
        if alert_kind is not None:
            wanted = wanted.where(Alert.kind == alert_kind)
        missing = session.scalars(wanted.order_by(AlertEvent.id).limit(limit)).all()
        session.add_all(
            Delivery(
                event_id=event_id,
                channel=channel,
                destination=destination,
                next_attempt_at=now,
                created_at=now,
            )
            for event_id in missing
        )
        made += len(missing)
    session.flush()
    return made


def claim_deliveries(
    session: Session, *, channel: str, worker: str, limit: int, lease_s: float, now: dt.datetime
) -> list[ClaimedDelivery]:
    """Due pending deliveries whose lease (if any) has run out, leased to ``worker``."""
    due = session.scalars(
        select(Delivery)
        .where(
            Delivery.channel == channel,
            Delivery.state == DeliveryState.PENDING,
            Delivery.next_attempt_at <= now,
            or_(Delivery.lease_until.is_(None), Delivery.lease_until < now),
        )
        .order_by(Delivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    claimed = []
    for row in due:
        row.lease_until = now + dt.timedelta(seconds=lease_s)
        row.claimed_by = worker
        claimed.append(ClaimedDelivery(row.id, row.event_id, row.destination, row.attempts))
    session.flush()
    return claimed


def release_deliveries_of(session: Session, *, claimant_prefix: str) -> int:
    """Hand back the leases of a node whose dispatcher is known dead (a restart): its pending
    messages go out at once, not when their leases run out a minute later."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.state == DeliveryState.PENDING,
            Delivery.lease_until.is_not(None),
            Delivery.claimed_by.startswith(claimant_prefix),
        )
        .values(lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def close_delivery(
    session: Session,
    *,
    delivery: ClaimedDelivery,
    worker: str,
    now: dt.datetime,
    error: str | None,
    retry_at: dt.datetime | None,
) -> bool:
    """Sent (``error`` None), to be retried at ``retry_at``, or given up (neither). False
    where the lease was lost: another dispatcher has it now."""
    values: dict[str, Any] = {
        "attempts": Delivery.attempts + 1,
        "lease_until": None,
        "last_error": error,
    }
    if error is None:
        values.update(state=DeliveryState.SENT, sent_at=now)
    elif retry_at is not None:
        values.update(next_attempt_at=retry_at)
    else:
        values.update(state=DeliveryState.GIVEN_UP)
    closed = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery.id,
            Delivery.claimed_by == worker,
            Delivery.state == DeliveryState.PENDING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(closed.rowcount == 1)  # type: ignore[attr-defined]


def event_with_alert(session: Session, *, event_id: int) -> tuple[AlertEvent, Alert] | None:
    row = session.execute(
        select(AlertEvent, Alert)
        .join(Alert, Alert.id == AlertEvent.alert_id)
        .where(AlertEvent.id == event_id)
    ).first()
    return (row[0], row[1]) if row is not None else None
