"""DICOM Structured Reports of the alerts, stored by C-STORE to the PACS through the outbox.

One Comprehensive SR an alert (modelled on IHE AI Results: the finding, the algorithm and its
versions, the scores, references to the flagged instances), in the study the flagged images
are filed under, so the PACS shows it with them. Built with highdicom from the flagged images'
headers as received (read from the spool). Its SOP Instance UID is made from the delivery, so
a message sent again is the same instance, which the PACS keeps once."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from medreid.outbox import DeliveryFailed
from medreid.outbox_settings import OutboxSettings, ReportMoment, parse_destination
from storage import audit
from storage.models import (
    Alert,
    AlertEvent,
    AlertEventKind,
    AlertKind,
    AlertState,
    Instance,
    Result,
)
from storage.outbox import ClaimedDelivery

SCHEME = "99MEDREID"  # our own concepts (a private coding scheme, PS3.16 8.2)
ALERT = Code("ALERT", SCHEME, "Image identity and modality check")
FINDINGS = {
    AlertKind.PATIENT_MISMATCH: Code(
        "PATIENT_MISMATCH", SCHEME, "Image resembles another patient than its header's"
    ),
    AlertKind.MODALITY_MISMATCH: Code(
        "MODALITY_MISMATCH", SCHEME, "Image modality differs from its header's Modality"
    ),
}
FINDING = Code("121071", "DCM", "Finding")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
SOURCE = Code("121112", "DCM", "Source of Measurement")
STATE = Code("STATE", SCHEME, "Review state")
SUSPECTED = Code("SUSPECTED", SCHEME, "Patient the image resembles")
HEADER_MODALITY = Code("HDR_MODALITY", SCHEME, "Modality in the header")
PREDICTED_MODALITY = Code("PRED_MODALITY", SCHEME, "Modality predicted from the pixels")
HEADER_SCORE = Code("HDR_SCORE", SCHEME, "Similarity to the header's patient")
THRESHOLD = Code("THRESHOLD", SCHEME, "Decision threshold")
NO_UNITS = Code("1", "UCUM", "no units")
MAX_REFERENCES = 64  # of a series' images


def derived_uid(*parts: object) -> str:
    """The same UID for the same parts (pydicom's, from its root and their hash)."""
    return str(generate_uid(entropy_srcs=[str(part) for part in parts]))


def flagged_headers(session: Session, spool_root: Path, alert: Alert) -> list[Dataset]:
    """The headers of the flagged image, or of the series' images, as received."""
    if alert.result_id is not None:
        instances = list(
            session.scalars(
                select(Instance)
                .join(Result, Result.instance_id == Instance.id)
                .where(Result.id == alert.result_id)
            )
        )
    else:
        instances = list(
            session.scalars(
                select(Instance)
                .where(Instance.series_instance_uid == alert.series_instance_uid)
                .order_by(Instance.id)
                .limit(MAX_REFERENCES)
            )
        )
    headers: list[Dataset] = []
    for instance in instances:
        try:
            headers.append(dcmread(spool_root / instance.spool_path, stop_before_pixels=True))
        except (OSError, InvalidDicomError) as exc:
            raise DeliveryFailed(f"the flagged image cannot be read: {exc}") from None
    if not headers:
        raise DeliveryFailed("no flagged image is stored to refer to")
    return headers


# Type 2 attributes of the patient and study that the report copies from the first image; a
# sender may leave them out, and the report then carries them empty, as type 2 allows.
_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_type2(header: Dataset) -> Dataset:
    complete = copy.copy(header)
    for keyword in _COPIED:
        if keyword not in complete:
            setattr(complete, keyword, "")
    return complete


def alert_report(
    alert: Alert, evidence: Sequence[Dataset], *, sop_instance_uid: str, version: str
) -> hd.sr.ComprehensiveSR:
    """The alert as a Comprehensive SR referring to ``evidence`` (in its study)."""
    items: list[Any] = [
        hd.sr.CodeContentItem(
            FINDING, FINDINGS[AlertKind(alert.kind)], relationship_type="CONTAINS"
        ),
        hd.sr.TextContentItem(STATE, str(alert.state), relationship_type="CONTAINS"),
        hd.sr.TextContentItem(ALGORITHM_NAME, "medreid", relationship_type="CONTAINS"),
    ]
    models = alert.detail.get("model_versions") or {}
    for slot, model in sorted(models.items()):
        items.append(
            hd.sr.TextContentItem(
                ALGORITHM_VERSION, f"{slot}: {model}"[:1024], relationship_type="CONTAINS"
            )
        )
    for name, value in (
        (SUSPECTED, alert.suspected_patient_id),
        (HEADER_MODALITY, alert.header_modality),
        (PREDICTED_MODALITY, alert.predicted_modality),
    ):
        if value:
            items.append(hd.sr.TextContentItem(name, value, relationship_type="CONTAINS"))
    for name, number in (
        (HEADER_SCORE, alert.detail.get("header_score")),
        (THRESHOLD, alert.detail.get("threshold")),
    ):
        if isinstance(number, int | float):
            items.append(
                hd.sr.NumContentItem(name, float(number), NO_UNITS, relationship_type="CONTAINS")
            )
    for header in evidence:
        items.append(
            hd.sr.ImageContentItem(
                SOURCE,
                header.SOPClassUID,
                header.SOPInstanceUID,
                relationship_type="CONTAINS",
            )
        )
    container = hd.sr.ContainerContentItem(ALERT)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[_with_type2(header) for header in evidence],
        content=container,
        series_instance_uid=derived_uid("medreid alert series", alert.id),
        series_number=9900,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="medreid",
        is_complete=True,
        is_final=alert.state != AlertState.OPEN,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        software_versions=version,
    )


class PacsChannel:
    """What the PACS channels share: C-STORE of one object a delivery, made from the flagged
    images' headers, to ``outbox.report_destinations``."""

    settings: OutboxSettings
    spool_root: Path
    node: str
    name: str
    events: Sequence[str] | None
    alert_state: str | None
    alert_kind: str | None = None

    @property
    def destinations(self) -> Sequence[str]:
        return self.settings.report_destinations

    @property
    def timeout_s(self) -> float:
        return self.settings.report_timeout_s

    def prepare(
        self, session: Session, delivery: ClaimedDelivery, event: AlertEvent, alert: Alert
    ) -> Dataset:
        evidence = flagged_headers(session, self.spool_root, alert)
        uid = derived_uid("medreid", self.name, self.node, delivery.id)
        return self.make(alert, evidence, uid)

    def make(self, alert: Alert, evidence: Sequence[Dataset], uid: str) -> Dataset:
        raise NotImplementedError

    def send(self, destination: str, message: Dataset) -> None:
        store(self.settings, destination, message)


class ReportChannel(PacsChannel):
    """Each alert's Structured Report, when raised or when confirmed."""

    sent = audit.REPORT_SENT
    given_up = audit.REPORT_GIVEN_UP

    def __init__(self, settings: OutboxSettings, spool_root: Path, node: str, version: str):
        self.settings, self.spool_root, self.node, self.version = (
            settings,
            spool_root,
            node,
            version,
        )
        self.name = "dicom"
        on_confirm = settings.send_reports_on == ReportMoment.CONFIRM
        self.events = (AlertEventKind.REVIEWED if on_confirm else AlertEventKind.RAISED,)
        self.alert_state = AlertState.CONFIRMED if on_confirm else None

    def make(self, alert: Alert, evidence: Sequence[Dataset], uid: str) -> Dataset:
        return alert_report(alert, evidence, sop_instance_uid=uid, version=self.version)


class RejectionChannel(PacsChannel):
    """IHE IOCM: a confirmed wrong-patient alert's images marked "Rejected for Patient Safety
    Reasons" by a Key Object Selection in their study (``outbox.send_rejection_notes``), so
    the PACS hides or removes them."""

    sent = audit.REJECTION_SENT
    given_up = audit.REJECTION_GIVEN_UP

    def __init__(self, settings: OutboxSettings, spool_root: Path, node: str) -> None:
        self.settings = settings
        self.spool_root = spool_root
        self.node = node
        self.name = "rejection"
        self.events = (AlertEventKind.REVIEWED,)
        self.alert_state = AlertState.CONFIRMED
        self.alert_kind = AlertKind.PATIENT_MISMATCH

    @property
    def destinations(self) -> Sequence[str]:
        return self.settings.report_destinations if self.settings.send_rejection_notes else ()

    def make(self, alert: Alert, evidence: Sequence[Dataset], uid: str) -> Dataset:
        return rejection_note(alert, evidence, sop_instance_uid=uid)


REJECTED_FOR_PATIENT_SAFETY = Code("113037", "DCM", "Rejected for Patient Safety Reasons")


def rejection_note(
    alert: Alert, evidence: Sequence[Dataset], *, sop_instance_uid: str
) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection titled (113037, DCM) referring to the wrong images."""
    complete = [_with_type2(header) for header in evidence]
    return hd.ko.KeyObjectSelectionDocument(
        evidence=complete,
        content=hd.ko.KeyObjectSelection(
            document_title=REJECTED_FOR_PATIENT_SAFETY,
            referenced_objects=complete,
            description=f"medreid alert {alert.id}: confirmed by {alert.reviewed_by}"[:1024],
        ),
        series_instance_uid=derived_uid("medreid rejection series", alert.id),
        series_number=9901,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="medreid",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def store(settings: OutboxSettings, destination: str, message: Dataset) -> None:
    """C-STORE one object to ``AE@host:port``; DeliveryFailed where it is not stored."""
    from pynetdicom import AE

    from scp.pynetdicom_adapter import guard_requests

    called, host, port = parse_destination(destination)
    timeout = settings.report_timeout_s
    ae = AE(ae_title=settings.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(message.SOPClassUID, ExplicitVRLittleEndian)
    assoc = guard_requests(ae.associate(host, port, ae_title=called))
    if not assoc.is_established:
        raise DeliveryFailed(f"{destination}: association not established")
    try:
        status = assoc.send_c_store(message)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryFailed(f"{destination}: no C-STORE response")
    if int(code) not in (0x0000, 0xB000, 0xB007, 0xB006):
        raise DeliveryFailed(f"{destination}: C-STORE status 0x{int(code):04X}")
