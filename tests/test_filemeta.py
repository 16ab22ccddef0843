"""The File Meta Information written before each received dataset: the same bytes as
pynetdicom's own encoder, for UIDs of odd and even length and every kind of syntax."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from scp.filemeta import file_meta_header


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.77.1.4", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_the_header_is_what_pynetdicom_would_write(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    reference = encode_file_meta(
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        )
    )
    header = file_meta_header(sop_class, sop_instance, syntax)
    assert header == b"\x00" * 128 + b"DICM" + reference
    meta = dcmread(io.BytesIO(header), stop_before_pixels=True).file_meta
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (sop_instance, syntax)
    assert meta.FileMetaInformationGroupLength == len(header) - 128 - 4 - 12
