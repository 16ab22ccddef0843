"""CLAHE (contrast-limited adaptive histogram equalisation) with OpenCV."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.records import FloatImage


@dataclass(frozen=True)
class ClaheParams:
    clip_limit: float = 2.0
    tile_grid: tuple[int, int] = (8, 8)


def _to_uint8(image: FloatImage) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def apply_clahe(image: FloatImage, params: ClaheParams) -> FloatImage:
    """CLAHE on one frame in [0, 1]: grey (rows, cols) or RGB (rows, cols, 3).

    Colour images are equalised on the lightness channel of CIE L*a*b*, so hues keep.
    """
    clahe = cv2.createCLAHE(clipLimit=params.clip_limit, tileGridSize=params.tile_grid)
    pixels = _to_uint8(image)
    if pixels.ndim == 2:
        out = clahe.apply(pixels)
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        lab = cv2.cvtColor(pixels, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
        out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    else:
        raise ValueError(f"apply_clahe expects a grey or RGB frame, got shape {image.shape}")
    return (out.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def apply_clahe_frames(frames: FloatImage, params: ClaheParams) -> FloatImage:
    """CLAHE on each frame of a (frames, rows, cols[, 3]) stack."""
    return np.stack([apply_clahe(frame, params) for frame in frames]).astype(np.float32)
