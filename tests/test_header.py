"""The receiver's header read: the structural walk keeps the indexed fields as it passes them,
and pydicom reads only values that are more than plain ASCII, with their character set."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from scp.status import DatasetTooLarge, DatasetUnreadable
from scp.store import HeaderFields, read_header
from scp.wellformed import check_well_formed
from support.dicom_factory import CT_IMAGE_STORAGE, make_dataset


def dataset_bytes(ds: Dataset, syntax: str) -> bytes:
    """The dataset as a C-STORE carries it: encoded in ``syntax``, without file meta."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


def ct(**attributes: object) -> Dataset:
    ds = make_dataset(
        np.arange(16, dtype=np.uint16).reshape(4, 4),
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        study_uid="1.2.826.0.1.3680043.8.498.2",
        patient_id="P-0042",
        **attributes,  # type: ignore[arg-type]
    )
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    return ds


EXPECTED = HeaderFields(
    sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
    sop_class_uid=CT_IMAGE_STORAGE,
    study_instance_uid="1.2.826.0.1.3680043.8.498.2",
    series_instance_uid="1.2.826.0.1.3680043.8.498.3",
    patient_id="P-0042",
    modality="CT",
)


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_the_indexed_fields_are_read_in_every_syntax(syntax: str) -> None:
    assert read_header(dataset_bytes(ct(), syntax), syntax) == EXPECTED


def test_only_top_level_values_are_kept_not_those_inside_sequences() -> None:
    ds = ct()
    other = Dataset()
    other.PatientID = "NOT-THIS-ONE"
    other.IssuerOfPatientID = "ELSEWHERE"
    ds.OtherPatientIDsSequence = [other]  # (0010,1002) comes after (0010,0020)
    data = dataset_bytes(ds, ExplicitVRLittleEndian)
    raw = check_well_formed(data, implicit=False, little=True, wanted=frozenset({0x00100020}))
    assert raw == {0x00100020: b"P-0042"}
    assert read_header(data, ExplicitVRLittleEndian).patient_id == "P-0042"


def test_padding_is_dropped_and_absent_fields_are_none() -> None:
    ds = ct()
    ds.PatientID = " P-0042  "
    del ds.Modality
    data = dataset_bytes(ds, ExplicitVRLittleEndian)
    # pydicom pads the odd-length UID with NUL; the kept value has none
    assert data.count(b"1.2.826.0.1.3680043.8.498.1\x00") >= 1
    assert read_header(data, ExplicitVRLittleEndian) == HeaderFields(
        **{**EXPECTED.__dict__, "modality": None}
    )


@pytest.mark.parametrize(
    ("charset", "patient_id"),
    [("ISO_IR 100", "MÜLLER-7"), ("ISO_IR 192", "患者-7"), ("ISO_IR 144", "ИВАНОВ-7")],
)
def test_text_beyond_ascii_is_read_with_the_datasets_character_set(
    charset: str, patient_id: str
) -> None:
    ds = ct(SpecificCharacterSet=charset)
    ds.PatientID = patient_id
    data = dataset_bytes(ds, ExplicitVRLittleEndian)
    assert patient_id.encode("ascii", "ignore") != patient_id.encode("utf-8")
    assert read_header(data, ExplicitVRLittleEndian).patient_id == patient_id


def test_a_truncated_dataset_is_refused_with_its_place() -> None:
    data = dataset_bytes(ct(), ExplicitVRLittleEndian)
    with pytest.raises(DatasetUnreadable, match="truncated at byte"):
        read_header(data[:-10], ExplicitVRLittleEndian)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_a_uid_over_64_characters_is_refused_never_cut(syntax: str) -> None:
    uid = "1.2.826.0.1.3680043.8.498." + "1" * 42  # 68 characters
    ds = ct()
    ds.SOPInstanceUID = uid
    with pytest.raises(DatasetUnreadable, match="SOPInstanceUID of 68 characters, over 64"):
        read_header(dataset_bytes(ds, syntax), syntax)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_a_multi_valued_patient_id_is_kept_in_dicoms_backslash_form(syntax: str) -> None:
    ds = ct()
    ds.PatientID = ["A", "B"]
    assert read_header(dataset_bytes(ds, syntax), syntax).patient_id == "A\\B"


def test_a_deflated_dataset_is_inflated_up_to_the_cap_and_refused_past_it() -> None:
    data = dataset_bytes(ct(), DeflatedExplicitVRLittleEndian)
    inflated = len(dataset_bytes(ct(), ExplicitVRLittleEndian))
    assert read_header(data, DeflatedExplicitVRLittleEndian, max_bytes=inflated) == EXPECTED
    with pytest.raises(DatasetTooLarge, match=f"dataset inflates past {inflated - 1} bytes"):
        read_header(data, DeflatedExplicitVRLittleEndian, max_bytes=inflated - 1)
