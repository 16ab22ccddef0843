"""Exceptions to DIMSE statuses, in one place."""

from __future__ import annotations

import errno

import pytest

from scp.status import (
    DatabaseUnavailable,
    DatasetMismatch,
    HeaderValueRefused,
    SpoolFull,
    StoreStatus,
    error_comment,
    status_for,
)


@pytest.mark.parametrize(
    ("exc", "status", "reason"),
    [
        (SpoolFull("below watermark"), StoreStatus.OUT_OF_RESOURCES, "below watermark"),
        (DatasetMismatch("no SOP Class UID"), 0xA900, "no SOP Class UID"),
        (OSError(errno.ENOSPC, "No space left"), StoreStatus.OUT_OF_RESOURCES, "spool disk full"),
        (OSError(errno.EIO, "I/O error"), 0xA700, "spool write failed: I/O error"),
        (DatabaseUnavailable("database unavailable"), 0xA701, "database unavailable"),
        (
            HeaderValueRefused("a header value cannot be stored"),
            0x0110,
            "a header value cannot be stored",
        ),
        (RuntimeError("bug"), StoreStatus.PROCESSING_FAILURE, "internal error: RuntimeError"),
    ],
)
def test_status_for(exc: BaseException, status: int, reason: str) -> None:
    assert status_for(exc) == (status, reason)


def test_error_comment_fits_and_has_no_backslash() -> None:
    comment = error_comment("a\\b\n" + "x" * 100)
    assert len(comment) == 64 and "\\" not in comment and "\n" not in comment
