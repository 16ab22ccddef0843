"""Synthetic brain MRI: a patient's head, folding pattern and ventricles, drawn per slice
and weighting (the helpers are ``synthetic.anatomy``'s)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from synthetic.anatomy import Image, Pose, Rng, blur, ellipse, fill, harmonic_contour, smooth_field


@dataclass(frozen=True)
class BrainAnatomy:
    head: tuple[float, float]
    head_shape: npt.NDArray[np.float64]
    gyri: npt.NDArray[np.float64]  # many harmonics: the folding pattern
    white: npt.NDArray[np.float64]
    ventricles: tuple[float, float, float]  # width, height, spread
    lesion: tuple[float, float, float] | None  # x, y, radius (relative to brain)
    z_start: float

    @classmethod
    def draw(cls, rng: Rng) -> BrainAnatomy:
        return cls(
            head=(rng.uniform(0.34, 0.40), rng.uniform(0.40, 0.46)),
            head_shape=rng.uniform(-0.03, 0.03, size=6),
            gyri=_sulci(rng),
            white=np.concatenate([rng.uniform(0.0, 0.06, size=10), rng.uniform(0, 6.28, size=10)]),
            ventricles=(rng.uniform(0.03, 0.06), rng.uniform(0.08, 0.14), rng.uniform(0.03, 0.06)),
            lesion=(
                float(rng.uniform(-0.5, 0.5)),
                float(rng.uniform(-0.5, 0.5)),
                float(rng.uniform(0.04, 0.1)),
            )
            if rng.random() < 0.25
            else None,
            z_start=rng.uniform(0.25, 0.45),
        )


def _sulci(rng: Rng) -> npt.NDArray[np.float64]:
    """Sulci: (angle, depth as a fraction of the brain radius, curvature), one row each."""
    n = int(rng.integers(22, 34))
    return np.column_stack(
        [
            np.sort(rng.uniform(0, 2 * math.pi, n)),
            rng.uniform(0.10, 0.30, n),
            rng.uniform(-0.25, 0.25, n),
        ]
    )


T1 = {"fat": 0.90, "bone": 0.06, "csf": 0.15, "grey": 0.45, "white": 0.68, "lesion": 0.30}
T2 = {"fat": 0.55, "bone": 0.05, "csf": 0.95, "grey": 0.58, "white": 0.40, "lesion": 0.85}


def render_brain(
    a: BrainAnatomy, z: float, weighting: str, rng: Rng, size: int, pose: Pose, scale: float
) -> Image:
    """An axial brain MR slice at relative level ``z`` (0 = skull base, 1 = vertex)."""
    tissue = T1 if weighting == "T1" else T2
    s = float(size)
    img = np.zeros((size, size), dtype=np.float32)
    centre = (s / 2, s / 2)
    level = math.sqrt(max(0.05, 1.0 - (z - 0.35) ** 2 * 1.6))  # smaller towards the vertex
    hx, hy = a.head[0] * level, a.head[1] * level
    # scalp, skull and the CSF around the brain: the same outline, each a little inside
    for inset, layer in ((0.0, "fat"), (0.02, "bone"), (0.04, "csf")):
        outline = harmonic_contour(
            centre,
            (hy - inset) * s,
            a.head_shape[:3],
            a.head_shape[3:] * 50,
            aspect=(hx - inset) / (hy - inset),
        )
        fill(img, outline, tissue[layer])
    brain_r = (hy - 0.05) * s
    aspect = (hx - 0.05) / (hy - 0.05)
    flat = np.zeros(3)
    fill(img, harmonic_contour(centre, brain_r, flat, flat, aspect=aspect), tissue["grey"])
    m = len(a.white) // 2
    fill(
        img,
        harmonic_contour(
            centre, brain_r * 0.74, a.white[:m], a.white[m:], aspect=aspect, points=360
        ),
        tissue["white"],
    )
    # the folding: sulci are clefts of CSF running in from the surface
    width = max(1, round(s / 200))
    for angle, depth, bend in a.gyri:
        points = []
        for t in np.linspace(0.0, 1.0, 8):
            radius = brain_r * (1.0 - depth * t)
            theta = angle + bend * depth * t
            points.append(
                (
                    centre[0] + radius * aspect * math.cos(theta),
                    centre[1] + radius * math.sin(theta),
                )
            )
        cv2.polylines(
            img, [np.array(points, np.int32)], False, tissue["csf"], width, lineType=cv2.LINE_AA
        )
    vw, vh, spread = a.ventricles
    size_at_level = max(0.0, 1.0 - abs(z - 0.5) * 2.2)
    if size_at_level > 0.05:
        for side in (-1, 1):
            ellipse(
                img,
                (centre[0] + side * spread * s, centre[1] - 0.02 * s),
                (vw * s * size_at_level, vh * s * size_at_level),
                side * 12,
                tissue["csf"],
            )
    if a.lesion is not None and abs(z - 0.5) < 0.3:
        lx, ly, lr = a.lesion
        ellipse(
            img,
            (centre[0] + lx * brain_r * 0.6, centre[1] + ly * brain_r * 0.6),
            (lr * brain_r, lr * brain_r * 0.8),
            0,
            tissue["lesion"],
        )
    img = blur(img, 0.7 * s / 256)
    img = pose.apply(img, 0.0)
    bias = 1.0 + 0.15 * smooth_field(rng, img.shape, 3)
    noise = rng.uniform(0.01, 0.03)
    real = img * bias + rng.normal(0, noise, img.shape)
    imag = rng.normal(0, noise, img.shape)
    return (np.sqrt(real**2 + imag**2) * scale).astype(np.float32)  # Rician magnitude
