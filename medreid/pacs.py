"""A well-behaved DICOM client of the PACS, for a patient's priors: Study Root C-FIND from
study down to image level, then C-GET (or C-MOVE to our own AE) of the few images chosen.

Every exchange runs within a deadline; whatever goes wrong (refused, silent, a failure
status) is a PacsUnavailable naming the node and why, never a hang."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from medreid.priors_settings import PacsNode, PriorsSettings, Retrieval
from scp.contexts import TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

FIND_MODEL = UID("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R Information Model - FIND
GET_MODEL = UID("1.2.840.10008.5.1.4.1.2.2.3")  # ... - GET
MOVE_MODEL = UID("1.2.840.10008.5.1.4.1.2.2.2")  # ... - MOVE

# The image storage classes priors come in (the modalities the models know): each proposed
# with the SCP role for C-GET, whose sub-operations store on our own association.
PRIOR_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
    "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic
)
# The syntaxes the worker decodes, little-endian uncompressed first (a PACS picks the first
# it has), leaving out Big Endian and Deflated, which a PACS need not send
RETRIEVE_SYNTAXES = tuple(
    s for s in TRANSFER_SYNTAXES if s not in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
)

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING = 0xB000  # retrieval: sub-operations complete, one or more failed


class PacsUnavailable(Exception):
    """The PACS could not be asked, or did not answer as asked; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PriorImage:
    """One earlier image found in the PACS."""

    node: str
    patient_id: str
    study_instance_uid: str
    study_date: str | None
    series_instance_uid: str
    sop_instance_uid: str
    modality: str


@dataclass
class Exchange:
    """What was asked of a node, for the audit: queries (level, matches) and retrievals."""

    node: str
    queries: list[tuple[str, int]] = field(default_factory=list)
    requested: int = 0
    received: int = 0
    failed: int = 0
    method: str = ""


def remaining(deadline: float, node: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PacsUnavailable(f"{node}: no answer within the priors budget")
    return left


def _status(response: Dataset | None, node: str, what: str) -> int:
    code = getattr(response, "Status", None)
    if code is None:
        raise PacsUnavailable(f"{node}: no {what} response (timed out or aborted)")
    return int(code)


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (the middle one for one)."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


class Slots:
    """At most ``settings.max_concurrent`` associations to the PACS at once from this host:
    lock files in a folder, shared by the worker processes."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count

    @contextlib.contextmanager
    def one(self, deadline: float, node: str) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            for i in range(self.count):
                handle = (self.folder / f"pacs-{i}.lock").open("a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                try:
                    yield
                    return
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
            remaining(deadline, node)
            time.sleep(0.05)


class PacsClient(Protocol):
    """One PACS node, over DIMSE or DICOMweb: searched at each level, and asked for images."""

    node: PacsNode

    def search(self, deadline: float) -> contextlib.AbstractContextManager[Search]: ...

    def retrieve(
        self, images: list[PriorImage], *, deadline: float, exchange: Exchange
    ) -> list[Dataset]: ...


class DimseClient:
    """Priors from one PACS node over DIMSE."""

    def __init__(self, node: PacsNode, settings: PriorsSettings, lock_folder: Path) -> None:
        self.node = node
        self.settings = settings
        self.slots = Slots(lock_folder, settings.max_concurrent)
        self._move_lock = lock_folder / "move.lock"

    def _ae(self, timeout: float) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.settings.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        return ae

    @contextlib.contextmanager
    def _association(
        self, deadline: float, *, retrieve: bool, handlers: list[Any] | None = None
    ) -> Iterator[Any]:
        from pynetdicom import build_role

        from scp.pynetdicom_adapter import guard_requests

        node = self.node
        with self.slots.one(deadline, node.name):
            ae = self._ae(min(self.settings.timeout_s, remaining(deadline, node.name)))
            ae.add_requested_context(FIND_MODEL)
            roles = []
            if retrieve and node.retrieval == Retrieval.GET:
                ae.add_requested_context(GET_MODEL)
                for sop_class in PRIOR_STORAGE_CLASSES:
                    ae.add_requested_context(sop_class, list(RETRIEVE_SYNTAXES))
                    roles.append(build_role(sop_class, scp_role=True))
            elif retrieve:
                ae.add_requested_context(MOVE_MODEL)
            try:
                assoc = guard_requests(
                    ae.associate(
                        node.host,
                        node.port,
                        ae_title=node.ae_title,
                        ext_neg=roles or None,
                        evt_handlers=handlers or [],
                    )
                )
            except OSError as exc:  # pragma: no cover - pynetdicom reports most as not established
                raise PacsUnavailable(f"{node.name}: {exc}") from None
            if not assoc.is_established:
                why = "rejected" if assoc.is_rejected else "refused or not answering"
                raise PacsUnavailable(f"{node.name}: association {why}")
            try:
                yield assoc
            finally:
                if assoc.is_established:
                    assoc.release()

    def _find(self, assoc: Any, query: Dataset, deadline: float, level: str) -> list[Dataset]:
        remaining(deadline, self.node.name)
        matches = []
        for status, identifier in assoc.send_c_find(query, FIND_MODEL):
            code = _status(status, self.node.name, f"C-FIND {level}")
            if code in PENDING:
                if identifier is not None:
                    matches.append(identifier)
                remaining(deadline, self.node.name)
            elif code != SUCCESS:
                raise PacsUnavailable(f"{self.node.name}: C-FIND {level} status 0x{code:04X}")
        return matches

    @contextlib.contextmanager
    def search(self, deadline: float) -> Iterator[Search]:
        """Study Root C-FIND at each level, on one association."""
        with self._association(deadline, retrieve=False) as assoc:
            yield _DimseSearch(self, assoc, deadline)

    def retrieve(
        self, images: list[PriorImage], *, deadline: float, exchange: Exchange
    ) -> list[Dataset]:
        """The images' datasets, by the node's retrieval method."""
        if not images:
            return []
        exchange.requested += len(images)
        if self.node.retrieval == Retrieval.GET:
            return self._get(images, deadline, exchange)
        return self._move(images, deadline, exchange)

    def _receiver(self, received: list[Dataset]) -> Any:
        from pynetdicom import evt

        def on_store(event: Any) -> int:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            received.append(dataset)
            return SUCCESS

        return (evt.EVT_C_STORE, on_store)

    def _get(self, images: list[PriorImage], deadline: float, exchange: Exchange) -> list[Dataset]:
        received: list[Dataset] = []
        with self._association(
            deadline, retrieve=True, handlers=[self._receiver(received)]
        ) as assoc:
            for image in images:
                self._retrieve_one(
                    assoc.send_c_get(_image_query(image), GET_MODEL), deadline, exchange, "C-GET"
                )
        exchange.received += len(received)
        return received

    def _move(self, images: list[PriorImage], deadline: float, exchange: Exchange) -> list[Dataset]:
        """C-MOVE to our move AE, listening on move_port while the moves run (one mover at a
        time on this host: the port is one)."""
        from pynetdicom import AE

        s = self.settings
        received: list[Dataset] = []
        self._move_lock.parent.mkdir(parents=True, exist_ok=True)
        with self._move_lock.open("a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    remaining(deadline, self.node.name)
                    time.sleep(0.05)
            listener = AE(ae_title=s.move_ae)
            listener.network_timeout = listener.acse_timeout = s.timeout_s
            for sop_class in PRIOR_STORAGE_CLASSES:
                listener.add_supported_context(sop_class, list(RETRIEVE_SYNTAXES))
            try:
                server = listener.start_server(
                    ("0.0.0.0", s.move_port), block=False, evt_handlers=[self._receiver(received)]
                )
            except OSError as exc:
                raise PacsUnavailable(
                    f"cannot listen on priors.move_port {s.move_port} for C-MOVE: {exc}"
                ) from None
            try:
                with self._association(deadline, retrieve=True) as assoc:
                    for image in images:
                        self._retrieve_one(
                            assoc.send_c_move(_image_query(image), s.move_ae, MOVE_MODEL),
                            deadline,
                            exchange,
                            "C-MOVE",
                        )
            finally:
                if server is not None:
                    server.shutdown()
        exchange.received += len(received)
        return received

    def _retrieve_one(
        self,
        responses: Iterator[tuple[Dataset, Any]],
        deadline: float,
        exchange: Exchange,
        what: str,
    ) -> None:
        for status, _identifier in responses:
            code = _status(status, self.node.name, what)
            if code in PENDING:
                remaining(deadline, self.node.name)
                continue
            failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
            exchange.failed += failed
            if code not in (SUCCESS, WARNING):
                raise PacsUnavailable(f"{self.node.name}: {what} status 0x{code:04X}")


class Search(Protocol):
    """Study Root queries of one node, at each level: C-FIND or QIDO-RS."""

    node_name: str

    def studies(self, patient_id: str, dates: str) -> list[Dataset]: ...

    def series(self, patient_id: str, study_uid: str) -> list[Dataset]: ...

    def images(self, patient_id: str, study_uid: str, series_uid: str) -> list[Dataset]: ...


class _DimseSearch:
    def __init__(self, client: DimseClient, assoc: Any, deadline: float) -> None:
        self.node_name = client.node.name
        self.client, self.assoc, self.deadline = client, assoc, deadline

    def _find(self, level: str, **keys: str) -> list[Dataset]:
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        return self.client._find(self.assoc, query, self.deadline, level)

    def studies(self, patient_id: str, dates: str) -> list[Dataset]:
        return self._find(
            "STUDY",
            PatientID=patient_id,
            StudyInstanceUID="",
            StudyDate=dates,
            ModalitiesInStudy="",
        )

    def series(self, patient_id: str, study_uid: str) -> list[Dataset]:
        return self._find(
            "SERIES",
            PatientID=patient_id,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID="",
            Modality="",
            SeriesNumber="",
        )

    def images(self, patient_id: str, study_uid: str, series_uid: str) -> list[Dataset]:
        return self._find(
            "IMAGE",
            PatientID=patient_id,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            SOPInstanceUID="",
            InstanceNumber="",
        )


def patients_of(studies: list[Dataset], modality_codes: set[str]) -> set[str]:
    """The patients of studies that hold one of the modalities (or do not say)."""
    patients = set()
    for study in studies:
        in_study = {str(m).upper() for m in _values(study.get("ModalitiesInStudy"))}
        if study.get("PatientID") and (not in_study or in_study & modality_codes):
            patients.add(str(study.PatientID))
    return patients


def choose_priors(
    search: Search,
    settings: PriorsSettings,
    *,
    patient_id: str,
    modality_codes: set[str],
    exclude_studies: set[str],
    dates: str,
    held: set[str],
    exchange: Exchange,
) -> list[PriorImage]:
    """Down from the patient's studies to the images to fetch: the newest max_studies
    studies of the modality in ``dates`` (a DICOM DA range, "20160101-"; not those
    excluded), series_per_study series of each by series number, images_per_series images
    of each spread over the series by instance number; those not held already."""
    studies = search.studies(patient_id, dates)
    exchange.queries.append(("STUDY", len(studies)))
    wanted = []
    for study in studies:
        uid = str(study.get("StudyInstanceUID", ""))
        in_study = {str(m).upper() for m in _values(study.get("ModalitiesInStudy"))}
        if not uid or uid in exclude_studies or (in_study and not in_study & modality_codes):
            continue
        wanted.append((str(study.get("StudyDate", "") or ""), uid))
    wanted.sort(reverse=True)
    images: list[PriorImage] = []
    for date, study_uid in wanted[: settings.max_studies]:
        found = search.series(patient_id, study_uid)
        exchange.queries.append(("SERIES", len(found)))
        series = sorted(
            (_number(x.get("SeriesNumber")), str(x.SeriesInstanceUID), str(x.Modality))
            for x in found
            if str(x.get("Modality", "")).upper() in modality_codes and x.get("SeriesInstanceUID")
        )
        for _, series_uid, modality in series[: settings.series_per_study]:
            found = search.images(patient_id, study_uid, series_uid)
            exchange.queries.append(("IMAGE", len(found)))
            ordered = sorted(
                (_number(x.get("InstanceNumber")), str(x.SOPInstanceUID))
                for x in found
                if x.get("SOPInstanceUID")
            )
            images += [
                PriorImage(
                    search.node_name,
                    patient_id,
                    study_uid,
                    date or None,
                    series_uid,
                    sop_uid,
                    modality,
                )
                for _, sop_uid in spread(ordered, settings.images_per_series)
                if sop_uid not in held
            ]
    return images


def _image_query(image: PriorImage) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.PatientID = image.patient_id
    query.StudyInstanceUID = image.study_instance_uid
    query.SeriesInstanceUID = image.series_instance_uid
    query.SOPInstanceUID = image.sop_instance_uid
    return query


def _values(value: Any) -> list[Any]:
    """A multi-valued element's values (pydicom gives a str for one value)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
