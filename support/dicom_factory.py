"""Small in-memory DICOM datasets for tests (stored values chosen by the test)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    sop_class_uid: str = CT_IMAGE_STORAGE,
    sop_instance_uid: str | None = None,
    patient_id: str = "P001",
    study_uid: str | None = None,
    modality: str = "CT",
    **attributes: Any,
) -> Dataset:
    """A dataset whose Pixel Data are ``pixels`` (frames, rows, cols[, samples]) or 2-D."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = f"Test^{patient_id}"
    ds.Modality = modality
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    frames = pixels if pixels.ndim == (4 if colour else 3) else pixels[np.newaxis]
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    if frames.shape[0] > 1:
        ds.NumberOfFrames = int(frames.shape[0])
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = frames.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if frames.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The Part 10 file bytes of ``ds``."""
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
