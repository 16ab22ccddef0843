"""The CLAHE-enhanced image of a stored instance, as a small PNG for the result page."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.records import FloatImage
from pipeline.runner import PipelineConfig, run_pipeline

THUMBNAIL_EDGE = 256


class ThumbnailError(Exception):
    """The image cannot be shown; the message says why (for the page, not the log)."""


def thumbnail_png(enhanced: FloatImage, edge: int = THUMBNAIL_EDGE) -> bytes:
    """The middle frame of a (frames, rows, cols[, 3]) stack in [0, 1], its longer side ``edge``."""
    frame = enhanced[len(enhanced) // 2]
    pixels = np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
    rows, cols = pixels.shape[:2]
    scale = edge / max(rows, cols)
    if scale < 1.0:
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise ThumbnailError("the image could not be encoded")
    return bytes(encoded.tobytes())


def stored_thumbnail(spool_root: Path, spool_path: str, config: PipelineConfig) -> bytes:
    """Decode and enhance the spooled file as the pipeline does, and shrink it."""
    path = (spool_root / spool_path).resolve()
    if not path.is_relative_to(spool_root.resolve()):
        raise ThumbnailError("the stored path lies outside the spool")
    result = run_pipeline(path, config)
    if result.enhanced is None:
        raise ThumbnailError(f"no image: {result.failed_stage} failed: {result.failure_reason}")
    return thumbnail_png(result.enhanced)
