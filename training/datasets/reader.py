"""The dataset layout, ``DATASET/<modality>/<patient_id>/*.{dcm,png,jpg}``, read through the
same decode and CLAHE stages the service runs, so training and serving see the same pixels."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.clahe import apply_clahe
from pipeline.decode import decode_dataset
from pipeline.records import FloatImage, StageError
from pipeline.runner import PipelineConfig, read_dataset

DICOM_SUFFIXES = {".dcm", ".dicom"}
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class DatasetItem:
    path: Path
    modality: str
    patient_id: str

    @property
    def visit(self) -> str:
        """The session a file belongs to: its name up to the first underscore."""
        return self.path.stem.split("_", 1)[0]


def is_image_file(path: Path) -> bool:
    return path.is_file() and (
        path.suffix.lower() in DICOM_SUFFIXES | PICTURE_SUFFIXES
        or (path.suffix == "" and _has_dicom_prefix(path))
    )


def _has_dicom_prefix(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def scan_modality(folder: Path, modality: str) -> list[DatasetItem]:
    """``folder/<patient_id>/<files>`` of one modality."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    items = []
    for patient in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(patient.iterdir()):
            if is_image_file(path):
                items.append(DatasetItem(path, modality, patient.name))
    return items


def scan(root: Path, modalities: Iterable[str] | None = None) -> list[DatasetItem]:
    """Every image of ``root/<modality>/<patient_id>/``, in a stable order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    wanted = set(modalities) if modalities is not None else None
    items: list[DatasetItem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is None or folder.name in wanted:
            items += scan_modality(folder, folder.name)
    return items


def read_picture(path: Path) -> FloatImage:
    """A PNG or JPEG as float [0, 1]: grey (rows, cols) or RGB (rows, cols, 3)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise StageError(f"cannot read image {path.name}")
    scale = 65535.0 if raw.dtype == np.uint16 else 255.0
    if raw.ndim == 3:
        raw = raw[:, :, :3]
        if np.array_equal(raw[:, :, 0], raw[:, :, 1]) and np.array_equal(
            raw[:, :, 1], raw[:, :, 2]
        ):
            raw = raw[:, :, 0]
        else:
            raw = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    return (raw.astype(np.float32) / np.float32(scale)).astype(np.float32)


def load_image(path: Path, config: PipelineConfig) -> FloatImage:
    """One image, decoded and enhanced as the service does it (first analysed frame)."""
    if path.suffix.lower() in PICTURE_SUFFIXES:
        image = read_picture(path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = decode_dataset(read_dataset(path), config.decode).frames[0]
    return apply_clahe(image, config.clahe)


def iter_images(
    items: Iterable[DatasetItem], config: PipelineConfig
) -> Iterator[tuple[DatasetItem, FloatImage | None, str | None]]:
    """Each item with its image, or None and the reason it could not be read."""
    for item in items:
        try:
            yield item, load_image(item.path, config), None
        except StageError as exc:
            yield item, None, exc.reason
