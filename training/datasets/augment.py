"""Offline augmentation export: N augmented, resized images per class folder.

The augmentation is the seed's (rotation, zoom, horizontal flip, brightness), done in
numpy / OpenCV: Keras' random layers inside a parallel input pipeline hung on two cores.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.records import FloatImage, StageError
from pipeline.runner import PipelineConfig
from training.datasets.reader import is_image_file, load_image


@dataclass(frozen=True)
class AugmentParams:
    rotation_deg: float = 15.0
    zoom: float = 0.1
    horizontal_flip: bool = True
    brightness: tuple[float, float] | None = None  # e.g. (0.8, 1.2)


def augment(image: FloatImage, params: AugmentParams, rng: np.random.Generator) -> FloatImage:
    """One random augmentation of a float [0, 1] image (grey or RGB)."""
    rows, cols = image.shape[:2]
    angle = rng.uniform(-params.rotation_deg, params.rotation_deg)
    # Keras' zoom_range=z draws the zoom factor from [1 - z, 1 + z].
    scale = rng.uniform(1.0 - params.zoom, 1.0 + params.zoom)
    matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), angle, scale)
    out = cv2.warpAffine(
        image, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    if params.horizontal_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if params.brightness is not None:
        out = out * rng.uniform(*params.brightness)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def class_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that hold images directly."""
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    return [f for f in folders if any(is_image_file(p) for p in f.iterdir())]


def to_uint8(image: FloatImage) -> np.ndarray:
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels[:, :, ::-1]) if pixels.ndim == 3 else pixels


def export_augmented(
    source: Path,
    destination: Path,
    *,
    per_class: int = 500,
    size: int = 100,
    params: AugmentParams | None = None,
    seed: int = 0,
    config: PipelineConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write ``per_class`` augmented PNGs of ``size`` x ``size`` for each class folder,
    mirroring the folders of ``source`` under ``destination``. Returns images per class."""
    params = params or AugmentParams()
    config = config or PipelineConfig()
    folders = class_folders(source)
    if not folders:
        raise FileNotFoundError(f"no images under {source}")
    total = per_class * len(folders)
    written: dict[str, int] = {}
    done = 0
    for folder in folders:
        relative = folder.relative_to(source)
        images = []
        for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
            try:
                images.append(load_image(path, config))
            except StageError:
                continue
        if not images:
            continue
        out_dir = destination / relative
        out_dir.mkdir(parents=True, exist_ok=True)
        # a stable per-folder stream (str hashes change between processes)
        folder_key = int.from_bytes(hashlib.sha256(str(relative).encode()).digest()[:4], "little")
        rng = np.random.default_rng([seed, folder_key])
        width = max(3, int(math.log10(max(per_class, 1))) + 1)
        for i in range(per_class):
            image = augment(images[i % len(images)], params, rng)
            image = np.asarray(
                cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA), np.float32
            )
            cv2.imwrite(str(out_dir / f"aug_{i:0{width}d}.png"), to_uint8(image))
            done += 1
            if progress:
                progress(done, total)
        written[str(relative)] = per_class
    return written
