"""DIMSE statuses and the one place where exceptions become them."""

from __future__ import annotations

import enum
import errno
import logging

log = logging.getLogger(__name__)

# The Error Comment (0000,0902) is LO: at most 64 characters.
ERROR_COMMENT_MAX = 64


class StoreStatus(enum.IntEnum):
    """C-STORE statuses (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700  # the spool below its watermark or full; a dataset over the cap
    OUT_OF_RESOURCES_DATABASE = 0xA701  # the database cannot record the instance now
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class StoreRefused(Exception):
    """A C-STORE that must not be answered Success; ``status`` and ``reason`` say why."""

    status: StoreStatus = StoreStatus.PROCESSING_FAILURE

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SpoolFull(StoreRefused):
    status = StoreStatus.OUT_OF_RESOURCES


class DatabaseUnavailable(StoreRefused):
    status = StoreStatus.OUT_OF_RESOURCES_DATABASE


class HeaderValueRefused(StoreRefused):
    """The database is there but refuses a value of this dataset: resending will not help."""


class DatasetUnreadable(StoreRefused):
    status = StoreStatus.CANNOT_UNDERSTAND


class DatasetTooLarge(StoreRefused):
    """Larger than ``scp.max_dataset_mb`` once inflated: refused for want of resources."""

    status = StoreStatus.OUT_OF_RESOURCES


class DatasetMismatch(StoreRefused):
    status = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


class SopClassNotSupported(StoreRefused):
    status = StoreStatus.SOP_CLASS_NOT_SUPPORTED


def status_for(exc: BaseException) -> tuple[StoreStatus, str]:
    """Map any exception raised while storing to a DIMSE status and a short reason. (The
    store turns the database's errors into StoreRefused ones, so none is named here.)"""
    if isinstance(exc, StoreRefused):
        return exc.status, exc.reason
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreStatus.OUT_OF_RESOURCES, "spool disk full"
    if isinstance(exc, OSError):
        return StoreStatus.OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}"
    log.exception("unexpected error while storing an instance")
    return StoreStatus.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"


def error_comment(reason: str) -> str:
    """The reason, cut to fit an Error Comment and stripped of backslashes."""
    clean = reason.replace("\\", "/").replace("\n", " ")
    return clean[:ERROR_COMMENT_MAX]
