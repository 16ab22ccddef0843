"""The File Meta Information (PS3.10 7.1) written before each received dataset, as bytes.

Built directly rather than through a pydicom dataset: it runs once per received instance and
holds six elements. The bytes are those pynetdicom's ``encode_file_meta(create_file_meta(...))``
gives (the tests compare them)."""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An element of group 0002 with a 2-byte length (Explicit VR Little Endian)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def padded(text: str, pad: bytes) -> bytes:
    """A value's bytes padded to an even length (PS3.5 7.1.1), as every element needs."""
    raw = text.encode("ascii", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> bytes:
    """Preamble, ``DICM`` and the group 0002 elements, ready to precede the dataset."""
    body = b"".join(
        (
            # (0002,0001) OB has a 4-byte length after two reserved bytes
            struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
            _short(0x0002, b"UI", padded(sop_class_uid, b"\x00")),
            _short(0x0003, b"UI", padded(sop_instance_uid, b"\x00")),
            _short(0x0010, b"UI", padded(transfer_syntax_uid, b"\x00")),
            _short(0x0012, b"UI", padded(implementation_uid, b"\x00")),
            _short(0x0013, b"SH", padded(implementation_version, b" ")),
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + group_length + body
