"""The settings of what leaves the service for people and systems outside: the outbox (DICOM
reports, rejection notes, retries) and the webhooks. Read with the rest by
``medreid.settings``, which reports a ValueError here as a SettingsError naming the key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from scp.settings import check_range

# What a webhook body may hold of an alert. Patient IDs leave the hospital only when listed.
WEBHOOK_FIELDS = (
    "event",
    "delivery_id",
    "alert_id",
    "kind",
    "scope",
    "state",
    "raised_at",
    "reviewed_at",
    "reviewed_by",
    "review_reason",
    "header_modality",
    "predicted_modality",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "patient_id",
    "suspected_patient_id",
)
DEFAULT_WEBHOOK_FIELDS = tuple(
    f for f in WEBHOOK_FIELDS if f not in ("patient_id", "suspected_patient_id")
)


@dataclass(frozen=True)
class WebhookSettings:
    """Each alert, and each review decision, POSTed as JSON to these URLs through the outbox,
    signed with HMAC-SHA256 under ``secret``. Off while ``urls`` is empty."""

    urls: tuple[str, ...] = ()
    secret: str = ""
    fields: tuple[str, ...] = DEFAULT_WEBHOOK_FIELDS
    timeout_s: float = 5.0

    def validate(self) -> None:
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhooks.urls: {url!r} is not an http(s) URL")
        if self.urls and len(self.secret) < 16:
            raise ValueError("webhooks.secret: 16 characters or more, shared with the receiver")
        unknown = sorted(set(self.fields) - set(WEBHOOK_FIELDS))
        if unknown:
            raise ValueError(
                f"webhooks.fields: unknown {', '.join(unknown)} "
                f"(known: {', '.join(WEBHOOK_FIELDS)})"
            )
        check_range("webhooks.timeout_s", self.timeout_s, 0.1, 120.0)


class ReportMoment(StrEnum):
    RAISE = "raise"  # when the alert is raised
    CONFIRM = "confirm"  # when a reviewer confirms it


_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` as (AE title, host, port); ValueError naming what is wrong."""
    match = _DESTINATION.match(text.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{text!r} is not AE@host:port")
    return match["ae"].strip(), match["host"], int(match["port"])


@dataclass(frozen=True)
class OutboxSettings:
    """What leaves for people and systems outside: DICOM Structured Reports of the alerts to
    ``report_destinations`` (C-STORE), and the webhooks. Every message is a row, retried with
    waits doubling from ``backoff_s`` to ``backoff_max_s`` until sent or given up after
    ``max_attempts``, across restarts."""

    report_destinations: tuple[str, ...] = ()  # AE@host:port
    calling_ae: str = "MEDREID"
    send_reports_on: str = ReportMoment.RAISE
    # IHE IOCM: a confirmed wrong-patient alert's images rejected for patient safety reasons
    send_rejection_notes: bool = False
    report_timeout_s: float = 30.0
    max_attempts: int = 10
    backoff_s: float = 5.0
    backoff_max_s: float = 900.0
    poll_interval_s: float = 2.0
    # events older than this when a destination is first configured are not sent to it
    backlog_h: float = 24.0

    def validate(self) -> None:
        for destination in self.report_destinations:
            try:
                parse_destination(destination)
            except ValueError as exc:
                raise ValueError(f"outbox.report_destinations: {exc}") from None
        if not 1 <= len(self.calling_ae.strip()) <= 16:
            raise ValueError("outbox.calling_ae: 1 to 16 characters")
        if self.send_reports_on not in set(ReportMoment):
            raise ValueError(
                f"outbox.send_reports_on: {self.send_reports_on!r} is not one of "
                f"{', '.join(ReportMoment)}"
            )
        check_range("outbox.report_timeout_s", self.report_timeout_s, 1.0, 600.0)
        check_range("outbox.max_attempts", self.max_attempts, 1, 1000)
        check_range("outbox.backoff_s", self.backoff_s, 0.0, 3600.0)
        check_range("outbox.backoff_max_s", self.backoff_max_s, 0.0, 86400.0)
        check_range("outbox.poll_interval_s", self.poll_interval_s, 0.05, 600.0)
        check_range("outbox.backlog_h", self.backlog_h, 0.0, 24.0 * 365)
