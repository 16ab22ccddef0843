"""The audit vocabulary (DICOM PS3.15 A.5 / IHE ATNA) and the record we append."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Any


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator of PS3.15 A.5.3."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


# The outcomes by the names `medreid audit --outcome` and the console's filter take.
OUTCOME_NAMES = {
    "success": Outcome.SUCCESS,
    "minor": Outcome.MINOR_FAILURE,
    "serious": Outcome.SERIOUS_FAILURE,
    "major": Outcome.MAJOR_FAILURE,
}


@dataclass(frozen=True)
class EventKind:
    code: str  # EventID code (DCM scheme)
    event: str  # EventID display name
    event_type: str | None  # EventTypeCode display, or our own precise label
    action: str  # EventActionCode: C, R, U, D, E


APPLICATION_START = EventKind("110100", "Application Activity", "Application Start", "E")
APPLICATION_STOP = EventKind("110100", "Application Activity", "Application Stop", "E")
ASSOCIATION_ACCEPTED = EventKind("110108", "Network Entry", "Association Accepted", "E")
ASSOCIATION_RELEASED = EventKind("110108", "Network Entry", "Association Released", "E")
ASSOCIATION_ABORTED = EventKind("110108", "Network Entry", "Association Aborted", "E")
ASSOCIATION_REJECTED = EventKind("110113", "Security Alert", "Association Rejected", "E")
# A failed DICOM TLS handshake: no or an untrusted client certificate, or no TLS at all.
TLS_REFUSED = EventKind("110113", "Security Alert", "Node Authentication", "E")
# A connection closed by the receiver's guard: a stalled association request, a PDU too long
# or too slow; or refused at accept, too many connections waiting to associate.
CONNECTION_DROPPED = EventKind("110113", "Security Alert", "Connection Dropped", "E")
CONNECTION_REFUSED = EventKind("110113", "Security Alert", "Connection Refused", "E")
# A spool file found at start-up that no row records (a write the service died during, or
# whose commit did not happen): moved to the quarantine folder, never deleted.
SPOOL_FILE_QUARANTINED = EventKind(
    "110103", "DICOM Instances Accessed", "Spool File Quarantined", "U"
)
INSTANCES_TRANSFERRED = EventKind("110104", "DICOM Instances Transferred", None, "C")
INSTANCE_REFUSED = EventKind("110104", "DICOM Instances Transferred", "Instance Refused", "C")
PROCESSING_FAILED = EventKind("110103", "DICOM Instances Accessed", "Processing Failure", "R")
MODALITY_MISMATCH = EventKind("110113", "Security Alert", "Modality Mismatch", "E")
PATIENT_MISMATCH = EventKind("110113", "Security Alert", "Patient Mismatch", "E")
# A reviewer's decision on an alert: confirmed (a real misfile or wrong tag) or dismissed.
ALERT_REVIEWED = EventKind("110113", "Security Alert", "Alert Reviewed", "U")
# An alert or a decision sent to a webhook, or given up after its retries.
WEBHOOK_SENT = EventKind("110106", "Export", "Webhook Sent", "R")
WEBHOOK_GIVEN_UP = EventKind("110106", "Export", "Webhook Given Up", "R")
# An alert's DICOM Structured Report stored to a PACS, or given up after its retries.
REPORT_SENT = EventKind("110106", "Export", "Report Sent", "R")
REPORT_GIVEN_UP = EventKind("110106", "Export", "Report Given Up", "R")
# An IHE IOCM rejection note of a confirmed wrong-patient alert's images.
REJECTION_SENT = EventKind("110106", "Export", "Rejection Note Sent", "R")
REJECTION_GIVEN_UP = EventKind("110106", "Export", "Rejection Note Given Up", "R")
GALLERY_ENROLLMENT = EventKind("110103", "DICOM Instances Accessed", "Gallery Enrollment", "C")
MODEL_ACTIVATED = EventKind("110100", "Application Activity", "Model Activated", "U")
AUDIT_LOG_USED = EventKind("110101", "Audit Log Used", None, "R")
QUERY = EventKind("110112", "Query", None, "E")
# The console: logins and logouts, the results a user opened, and changes to its users.
USER_AUTHENTICATION = EventKind("110114", "User Authentication", "Login", "E")
# a login refused unchecked: too many failures of this name from this address, or from it
LOGIN_LOCKED = EventKind("110114", "User Authentication", "Login While Locked", "E")
USER_LOGOUT = EventKind("110114", "User Authentication", "Logout", "E")
RESULT_VIEWED = EventKind("110103", "DICOM Instances Accessed", "Result Viewed", "R")
USER_CHANGED = EventKind("110113", "Security Alert", "User Security Attributes Changed", "E")


@dataclass(frozen=True)
class AuditRecord:
    kind: EventKind
    outcome: Outcome = Outcome.SUCCESS
    actor_ae: str | None = None
    actor_host: str | None = None
    actor_user: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    occurred_at: dt.datetime | None = None  # None: now, by the system clock
