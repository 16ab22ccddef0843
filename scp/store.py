"""The C-STORE service behind the thin network handler: validate, write durably, record."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import re
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from scp.records import StoredInstance, StoreRequest
from scp.spool import Spool, is_valid_uid
from scp.status import (
    DatabaseUnavailable,
    DatasetMismatch,
    DatasetTooLarge,
    DatasetUnreadable,
    HeaderValueRefused,
    SopClassNotSupported,
    SpoolFull,
)
from scp.wellformed import InflatesTooLarge, MalformedDataset, check_well_formed, inflate
from storage.db import snapshot
from storage.groupcommit import CommitOutcomeUnknown, GroupCommit
from storage.instances import NewInstance, record_instance, stored_versions
from storage.models import Instance

log = logging.getLogger(__name__)

# scp.max_dataset_mb's default
DEFAULT_MAX_DATASET_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class HeaderFields:
    sop_instance_uid: str | None
    sop_class_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    patient_id: str | None
    modality: str | None


# keyword, tag and the most characters kept (the column's width) of each indexed field
_INDEXED_FIELDS = {
    "sop_instance_uid": ("SOPInstanceUID", 0x00080018, 64),
    "sop_class_uid": ("SOPClassUID", 0x00080016, 64),
    "study_instance_uid": ("StudyInstanceUID", 0x0020000D, 64),
    "series_instance_uid": ("SeriesInstanceUID", 0x0020000E, 64),
    "patient_id": ("PatientID", 0x00100020, 64),
    "modality": ("Modality", 0x00080060, 16),
}
_INDEXED_TAGS = frozenset(tag for _keyword, tag, _limit in _INDEXED_FIELDS.values())
# The fields are all at or before (0020,000E) Series Instance UID, so where pydicom must read
# them it need not read the rest (the pixel data least of all).
_LAST_INDEXED_TAG = max(_INDEXED_TAGS)
# Bytes that make a value more than plain text: any of the character set's own bytes, the
# ESC of ISO 2022 code extensions, the backslash between values.
_NOT_PLAIN = re.compile(rb"[^\x00-\x1a\x1c-\x5b\x5d-\x7f]")


def _clean(text: str, limit: int, keyword: str) -> str | None:
    # NUL pads UIDs, and PostgreSQL refuses it inside text
    text = text.replace("\x00", "").strip()
    if len(text) > limit:
        # cut, a UID or a patient ID would name another instance or patient: refused instead
        raise DatasetUnreadable(f"{keyword} of {len(text)} characters, over {limit}")
    return text or None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        # stored as DICOM writes it, values between backslashes
        return _clean("\\".join(str(item) for item in value), limit, keyword)
    return _clean(str(value), limit, keyword)


def _after_indexed_fields(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag > _LAST_INDEXED_TAG


@functools.lru_cache(maxsize=64)
def _syntax_flags(transfer_syntax_uid: str) -> tuple[bool, bool, bool]:
    """Implicit VR, little endian, deflated."""
    syntax = UID(transfer_syntax_uid)
    return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated


def read_header(
    dataset: bytes, transfer_syntax_uid: str, *, max_bytes: int = DEFAULT_MAX_DATASET_BYTES
) -> HeaderFields:
    """Check the received dataset's structure, then read the fields we index by.

    The structural walk refuses truncated or garbled data while the sender still waits for
    our answer, and keeps the indexed fields' values as it passes them. Those in plain ASCII
    (nearly all) are read from there; pydicom reads the rest, with the dataset's character
    set. A deflated dataset is inflated as a stream, up to ``max_bytes``."""
    implicit, little, deflated = _syntax_flags(transfer_syntax_uid)
    try:
        if deflated:
            dataset = inflate(dataset, max_bytes)
        raw = check_well_formed(dataset, implicit=implicit, little=little, wanted=_INDEXED_TAGS)
    except InflatesTooLarge as exc:
        raise DatasetTooLarge(f"{exc} (scp.max_dataset_mb)") from exc
    except MalformedDataset as exc:
        raise DatasetUnreadable(f"dataset cannot be parsed: {exc}") from exc
    if not any(_NOT_PLAIN.search(value) for value in raw.values()):
        return HeaderFields(
            **{
                name: _clean(raw[tag].decode("ascii"), limit, keyword) if tag in raw else None
                for name, (keyword, tag, limit) in _INDEXED_FIELDS.items()
            }
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(
                io.BytesIO(dataset), implicit, little, stop_when=_after_indexed_fields
            )
    except Exception as exc:
        raise DatasetUnreadable(f"dataset cannot be parsed: {type(exc).__name__}") from exc
    try:
        return HeaderFields(
            **{
                name: _text(ds, keyword, limit)
                for name, (keyword, _tag, limit) in _INDEXED_FIELDS.items()
            }
        )
    except DatasetUnreadable:
        raise
    except Exception as exc:
        raise DatasetUnreadable(f"dataset cannot be parsed: {type(exc).__name__}") from exc


def _record(session: Session, item: tuple[NewInstance, int, str]) -> int:
    new, version, spool_path = item
    return record_instance(session, new=new, version=version, spool_path=spool_path)


# Below this size a thread handoff costs about what hashing beside the write saves.
OVERLAP_MIN_BYTES = 256 * 1024
# Pools for the process: their threads start on first use and idle between datasets.
_HASHING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medreid-hash")
# a thread for each association that may be storing at once
_SYNCING = ThreadPoolExecutor(max_workers=32, thread_name_prefix="medreid-fsync")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StoreService:
    def __init__(
        self,
        *,
        spool: Spool,
        sessions: sessionmaker[Session],
        min_free_bytes: int,
        supported_sop_classes: frozenset[str],
        max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.min_free_bytes = min_free_bytes
        self.supported_sop_classes = supported_sop_classes
        self.max_dataset_bytes = max_dataset_bytes
        # Stores of one UID are serialised within this process, so that the version number
        # and the duplicate check cannot race; different UIDs run in parallel.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        # Associations storing at once share their commits (and fsyncs).
        self._records: GroupCommit[tuple[NewInstance, int, str], int] = GroupCommit(
            sessions, _record
        )

    def check_request(self, request: StoreRequest) -> HeaderFields:
        if request.sop_class_uid not in self.supported_sop_classes:
            raise SopClassNotSupported(f"SOP class {request.sop_class_uid} is not stored here")
        if not is_valid_uid(request.sop_instance_uid):
            raise DatasetUnreadable("invalid SOP Instance UID")
        if self.spool.free_bytes() < self.min_free_bytes + len(request.dataset):
            raise SpoolFull("spool disk below its free-space watermark")
        header = read_header(
            request.dataset, request.transfer_syntax_uid, max_bytes=self.max_dataset_bytes
        )
        # Both are Type 1 in every storage SOP class: a dataset without them is not an instance.
        if header.sop_instance_uid is None:
            raise DatasetMismatch("dataset has no SOP Instance UID")
        if header.sop_class_uid is None:
            raise DatasetMismatch("dataset has no SOP Class UID")
        if header.sop_instance_uid != request.sop_instance_uid:
            raise DatasetMismatch("SOP Instance UID differs from the command's")
        if header.sop_class_uid != request.sop_class_uid:
            raise DatasetMismatch("SOP Class UID differs from the command's")
        return header

    def store(self, request: StoreRequest, *, association_id: int | None) -> StoredInstance:
        """Write durably and record; raises a StoreRefused (or another error) otherwise."""
        try:
            return self._store(request, association_id=association_id)
        except DataError as exc:
            raise HeaderValueRefused("a header value cannot be stored") from exc
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable("database unavailable") from exc

    def _store(self, request: StoreRequest, *, association_id: int | None) -> StoredInstance:
        header = self.check_request(request)
        uid = request.sop_instance_uid
        lock = self._uid_locks[hash(uid) % len(self._uid_locks)]
        sha256: str | None = None  # known after the first write, not hashed again
        with lock:
            for attempt in range(4):
                if attempt == 0:
                    # Nearly every UID arrives once: store it as version 1 without looking
                    # first. The unique keys on (UID, version) and (UID, SHA-256) refuse the
                    # row of a UID stored before, and then we look.
                    versions: dict[str, int] = {}
                else:
                    # no write lock, so receiving associations do not queue for it (a
                    # concurrent insert of this UID fails below and looks again)
                    with snapshot(self.sessions) as session:
                        versions = stored_versions(session, sop_instance_uid=uid)
                version = max(versions.values(), default=0) + 1
                sha256, path, durable = self._write(request, versions, version, sha256)
                if path is None:
                    return self._duplicate(header, versions[sha256], len(request.dataset))
                new = NewInstance(
                    sop_instance_uid=uid,
                    sop_class_uid=request.sop_class_uid,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    patient_id=header.patient_id,
                    modality=header.modality,
                    transfer_syntax_uid=request.transfer_syntax_uid,
                    size_bytes=len(request.file_header) + len(request.dataset),
                    sha256=sha256,
                    calling_ae=request.peer.calling_ae,
                    peer_host=request.peer.host,
                    association_id=association_id,
                )
                try:
                    # with a file still being made durable, the rows are written meanwhile
                    # and committed once it is (submit returns only then, whatever happens)
                    instance_id = self._records.submit(
                        (new, version, self.spool.relative(path)), ready=durable
                    )
                except IntegrityError:
                    # Stored before, or by another process meanwhile: look, and go again. (A
                    # resent identical dataset was just renamed over its own stored file, with
                    # the same bytes, which stays.)
                    self._discard_unless_recorded(path)
                    continue
                except CommitOutcomeUnknown as exc:
                    # The commit itself failed: the row may be there, so the file stays
                    # unless the database can say it is not.
                    self._discard_after_failure(path)
                    raise DatabaseUnavailable("the database failed while committing") from exc
                except DBAPIError:
                    # Raised before the commit, and rolled back (the database is away or
                    # refused it): the sender is told so and sends again, and the spool keeps
                    # only what was acknowledged.
                    self.spool.discard(path)
                    raise
                except Exception:
                    self._discard_after_failure(path)
                    raise
                return StoredInstance(
                    instance_id=instance_id,
                    version=version,
                    duplicate=False,
                    patient_id=header.patient_id,
                    study_instance_uid=header.study_instance_uid,
                    size_bytes=new.size_bytes,
                )
        # A transient race with another process on the same UID: ask the sender to retry.
        raise DatabaseUnavailable("SOP Instance UID is being stored concurrently; send it again")

    def _write(
        self,
        request: StoreRequest,
        versions: dict[str, int],
        version: int,
        sha256: str | None,
    ) -> tuple[str, Path | None, Future[Path] | None]:
        """The dataset's SHA-256 (hashed here unless given) and its spool path, or no path
        when it is a stored version; with the future of its fsync and naming where those
        are still under way."""
        chunks = (request.file_header, request.dataset)
        uid = request.sop_instance_uid
        if sha256 is not None or versions or len(request.dataset) < OVERLAP_MIN_BYTES:
            sha256 = sha256 or _sha256(request.dataset)
            if sha256 in versions:
                return sha256, None, None
            return sha256, self.spool.write(uid, version, sha256, chunks), None
        # No stored version to compare with (a UID tried as new): hash while the file is
        # written, then fsync and name it on a helper thread while its rows are written.
        digest = _HASHING.submit(_sha256, request.dataset)
        staged = self.spool.stage(uid, chunks, sync=False)  # a failure leaves no file
        durable = _SYNCING.submit(self._sync_and_place, staged, uid, version, digest)
        try:
            sha256 = digest.result()
        except BaseException:
            wait_for([durable])  # which removes the file
            raise
        return sha256, self.spool.path_for(uid, version, sha256), durable

    def _sync_and_place(self, staged: Path, uid: str, version: int, digest: Future[str]) -> Path:
        self.spool.sync(staged)
        try:
            sha256 = digest.result()
        except BaseException:
            self.spool.discard(staged)
            raise
        return self.spool.place(staged, uid, version, sha256)

    def _duplicate(self, header: HeaderFields, version: int, size: int) -> StoredInstance:
        return StoredInstance(
            instance_id=None,
            version=version,
            duplicate=True,
            patient_id=header.patient_id,
            study_instance_uid=header.study_instance_uid,
            size_bytes=size,
        )

    def _discard_unless_recorded(self, path: Path) -> None:
        relative = self.spool.relative(path)
        with snapshot(self.sessions) as session:
            referenced = session.scalar(
                select(Instance.id).where(Instance.spool_path == relative).limit(1)
            )
        if referenced is None:
            self.spool.discard(path)

    def _discard_after_failure(self, path: Path) -> None:
        try:
            self._discard_unless_recorded(path)
        except Exception as exc:
            # Whether the commit landed is unknown: keep the file rather than risk a row
            # without its dataset.
            log.warning("kept %s: cannot tell whether it was recorded (%s)", path, exc)
