"""Synthetic dermoscopy: a patient's skin and lesion, drawn per visit (the helpers are
``synthetic.anatomy``'s)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from synthetic.anatomy import Image, Pose, Rng, ellipse, harmonic_contour, mask_of, smooth_field


@dataclass(frozen=True)
class LesionAnatomy:
    skin: tuple[float, float, float]
    lesion_colour: tuple[float, float, float]
    radius: float
    shape: npt.NDArray[np.float64]
    network: tuple[float, float, float]  # spatial frequency, orientation, strength
    globules: npt.NDArray[np.float64]  # (n, 3): x, y, radius relative to the lesion
    blue_white: tuple[float, float] | None
    hairiness: float
    aspect: float

    @classmethod
    def draw(cls, rng: Rng) -> LesionAnatomy:
        tone = rng.uniform(0.0, 1.0)
        skin = (0.93 - 0.45 * tone, 0.76 - 0.42 * tone, 0.66 - 0.40 * tone)
        brown = rng.uniform(0.25, 0.6)
        return cls(
            skin=skin,
            lesion_colour=(brown, brown * rng.uniform(0.55, 0.75), brown * rng.uniform(0.35, 0.6)),
            radius=rng.uniform(0.16, 0.28),
            shape=np.concatenate([rng.uniform(0.0, 0.07, size=6), rng.uniform(0, 6.28, size=6)]),
            network=(rng.uniform(18, 40), rng.uniform(0, math.pi), rng.uniform(0.15, 0.4)),
            globules=_globules(rng),
            blue_white=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3)))
            if rng.random() < 0.3
            else None,
            hairiness=rng.uniform(0.0, 1.0) ** 2,
            aspect=rng.uniform(0.75, 1.0),
        )


def _globules(rng: Rng) -> npt.NDArray[np.float64]:
    n = int(rng.integers(2, 9))
    return np.column_stack(
        [rng.uniform(-0.6, 0.6, n), rng.uniform(-0.6, 0.6, n), rng.uniform(0.03, 0.09, n)]
    )


def render_dermoscopy(a: LesionAnatomy, visit: int, rng: Rng, size: int) -> Image:
    """A dermoscopic photograph, RGB in [0, 1]."""
    s = float(size)
    growth = 1.0 + 0.03 * visit
    img = np.empty((size, size, 3), dtype=np.float32)
    texture = 0.03 * smooth_field(rng, (size, size), 40)
    for c in range(3):
        img[:, :, c] = a.skin[c] + texture
    n = len(a.shape) // 2
    contour = harmonic_contour(
        (s / 2, s / 2), a.radius * s * growth, a.shape[:n], a.shape[n:], aspect=a.aspect, angle=0.3
    )
    lesion = cv2.GaussianBlur(mask_of((size, size), contour), (0, 0), 3.0 * s / 384)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    f, theta, strength = a.network
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    network = (np.abs(np.sin(f * math.pi * u)) * np.abs(np.sin(f * math.pi * v))) ** 0.5
    pigment = 1.0 - strength * network
    for c in range(3):
        img[:, :, c] = img[:, :, c] * (1 - lesion) + a.lesion_colour[c] * pigment * lesion
    r_px = a.radius * s * growth
    for gx, gy, gr in a.globules:
        ellipse(
            img,
            (s / 2 + gx * r_px, s / 2 + gy * r_px),
            (gr * r_px, gr * r_px),
            0,
            tuple(0.6 * c for c in a.lesion_colour),
        )
    if a.blue_white is not None:
        bx, by = a.blue_white
        ellipse(
            img,
            (s / 2 + bx * r_px, s / 2 + by * r_px),
            (0.25 * r_px, 0.2 * r_px),
            20,
            (0.55, 0.62, 0.72),
        )
    # the visit: the dermatoscope's orientation, zoom and place; hair; light; vignetting
    img = Pose.draw(rng, rotation=30.0, scale=0.08, shift=0.05).apply(img, a.skin)
    for _ in range(int(a.hairiness * 25 * rng.uniform(0.3, 1.0))):
        start = rng.uniform(0, s, 2)
        angle = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.2, 0.7) * s
        bend = rng.uniform(-0.3, 0.3)
        points = np.array(
            [
                start
                + t * length * np.array([math.cos(angle + bend * t), math.sin(angle + bend * t)])
                for t in np.linspace(0, 1, 12)
            ],
            dtype=np.int32,
        )
        cv2.polylines(
            img, [points], False, (0.12, 0.09, 0.07), max(1, round(s / 192)), lineType=cv2.LINE_AA
        )
    light = rng.uniform(0.85, 1.1) * np.array(
        [rng.uniform(0.95, 1.05), 1.0, rng.uniform(0.92, 1.08)], np.float32
    )
    img *= light
    radius = rng.uniform(0.62, 0.75) * s
    distance = np.sqrt((xx * s - s / 2) ** 2 + (yy * s - s / 2) ** 2)
    vignette = np.clip(1.0 - np.clip((distance - radius) / (0.12 * s), 0, 1), 0, 1) ** 1.5
    img *= vignette[:, :, None]
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)
