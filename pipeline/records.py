"""Typed records passed between pipeline stages."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]


class Modality(enum.StrEnum):
    """The modalities the models know, as COMPA names them and the models are routed by."""

    XRAY = "xray"
    CT = "ct"
    MRI = "mri"
    DERMOSCOPY = "dermoscopy"


class StageError(Exception):
    """A stage could not handle this input; ``reason`` says why, for the result row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """Pixels with the DICOM display semantics applied, scaled to [0, 1].

    ``frames`` has shape (n_frames, rows, columns) for grey images and
    (n_frames, rows, columns, 3) for colour (RGB) images.
    """

    frames: FloatImage
    frames_total: int
    frames_analysed: tuple[int, ...]
    photometric: str

    @property
    def is_colour(self) -> bool:
        return self.frames.ndim == 4


@dataclass(frozen=True)
class IntensityStats:
    mean: float
    std: float
    min: float
    max: float
    p01: float
    p99: float

    @classmethod
    def of(cls, pixels: FloatImage) -> IntensityStats:
        flat = pixels.reshape(-1)
        p01, p99 = np.percentile(flat, [1.0, 99.0])
        return cls(
            mean=round(float(flat.mean()), 6),
            std=round(float(flat.std()), 6),
            min=round(float(flat.min()), 6),
            max=round(float(flat.max()), 6),
            p01=round(float(p01), 6),
            p99=round(float(p99), 6),
        )
