"""Rendering of synthetic anatomy: per-patient parameters that persist across visits, and
per-visit variation (pose, exposure, noise, slice position, slow change over time). This module
draws chest X-rays and abdominal CT and holds the drawing helpers; ``synthetic.brain`` and
``synthetic.skin`` draw brain MRI and dermoscopy.

Each ``render_*`` function is pure: the same parameters and generator state give the same
pixels. Images are float32; grey images are in the modality's physical units (X-ray: relative
attenuation in [0, 1]; CT: Hounsfield units; MR: arbitrary signal), colour images RGB in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.float32]
Rng = np.random.Generator


def blur(image: Image, sigma: float) -> Image:
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma), dtype=np.float32)


def smooth_field(rng: Rng, size: tuple[int, int], cells: int) -> Image:
    """A smooth random field in about [-1, 1]: random values on a coarse grid, upsampled."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.asarray(field / (np.abs(field).max() + 1e-6), dtype=np.float32)


def harmonic_contour(
    center: tuple[float, float],
    radius: float,
    amplitudes: npt.NDArray[np.float64],
    phases: npt.NDArray[np.float64],
    aspect: float = 1.0,
    angle: float = 0.0,
    points: int = 180,
) -> npt.NDArray[np.int32]:
    """A closed contour r(t) = radius * (1 + sum a_k cos(k t + p_k)), as polygon points."""
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    k = np.arange(2, 2 + len(amplitudes))[:, None]
    r = radius * (1.0 + (amplitudes[:, None] * np.cos(k * t + phases[:, None])).sum(axis=0))
    x, y = r * np.cos(t) * aspect, r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    xs = center[0] + ca * x - sa * y
    ys = center[1] + sa * x + ca * y
    return np.stack([xs, ys], axis=1).round().astype(np.int32)


def fill(image: Image, polygon: npt.NDArray[np.int32], value: float | tuple[float, ...]) -> None:
    cv2.fillPoly(image, [polygon.reshape(-1, 1, 2)], value, lineType=cv2.LINE_AA)


def mask_of(shape: tuple[int, int], polygon: npt.NDArray[np.int32]) -> Image:
    mask = np.zeros(shape, dtype=np.float32)
    fill(mask, polygon, 1.0)
    return mask


def ellipse(
    image: Image,
    center: tuple[float, float],
    axes: tuple[float, float],
    angle: float,
    value: float | tuple[float, ...],
    thickness: int = -1,
) -> None:
    cv2.ellipse(
        image,
        (round(center[0]), round(center[1])),
        (max(1, round(axes[0])), max(1, round(axes[1]))),
        angle,
        0,
        360,
        value,
        thickness,
        lineType=cv2.LINE_AA,
    )


@dataclass(frozen=True)
class Pose:
    """Per-visit position of the patient in the field of view."""

    rotation_deg: float
    scale: float
    shift: tuple[float, float]  # fraction of the image size

    @classmethod
    def draw(cls, rng: Rng, rotation: float, scale: float, shift: float) -> Pose:
        return cls(
            rotation_deg=float(rng.uniform(-rotation, rotation)),
            scale=float(rng.uniform(1 - scale, 1 + scale)),
            shift=(float(rng.uniform(-shift, shift)), float(rng.uniform(-shift, shift))),
        )

    def apply(self, image: Image, border: float | tuple[float, ...]) -> Image:
        rows, cols = image.shape[:2]
        matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), self.rotation_deg, self.scale)
        matrix[0, 2] += self.shift[0] * cols
        matrix[1, 2] += self.shift[1] * rows
        return np.asarray(
            cv2.warpAffine(
                image,
                matrix,
                (cols, rows),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=border,
            ),
            dtype=np.float32,
        )


# --------------------------------------------------------------------------- chest X-ray


@dataclass(frozen=True)
class ChestAnatomy:
    thorax: tuple[float, float]  # half-width, half-height (fraction of size)
    lungs: tuple[tuple[float, ...], tuple[float, ...]]  # (cx, cy, ax, ay, tilt) each
    lung_shape: npt.NDArray[np.float64]  # contour harmonics (amplitudes, phases)
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, tilt
    diaphragm: tuple[float, float]  # right, left dome heights (fraction)
    rib_spacing: float
    rib_curve: float
    clavicle_angle: float
    spine_width: float
    soft_tissue: float
    device: str | None  # "pacemaker", "port" or None
    texture_seed: int
    female: bool

    @classmethod
    def draw(cls, rng: Rng, female: bool) -> ChestAnatomy:
        return cls(
            thorax=(rng.uniform(0.36, 0.44), rng.uniform(0.40, 0.46)),
            lungs=(
                (
                    rng.uniform(0.30, 0.35),
                    rng.uniform(0.44, 0.50),
                    rng.uniform(0.12, 0.16),
                    rng.uniform(0.26, 0.32),
                    rng.uniform(-8, 8),
                ),
                (
                    rng.uniform(0.65, 0.70),
                    rng.uniform(0.44, 0.50),
                    rng.uniform(0.11, 0.15),
                    rng.uniform(0.25, 0.31),
                    rng.uniform(-8, 8),
                ),
            ),
            lung_shape=rng.uniform(-0.05, 0.05, size=(2, 6)),
            heart=(
                rng.uniform(0.53, 0.60),
                rng.uniform(0.60, 0.66),
                rng.uniform(0.10, 0.16),
                rng.uniform(0.09, 0.13),
                rng.uniform(-25, 5),
            ),
            diaphragm=(rng.uniform(0.70, 0.78), rng.uniform(0.72, 0.80)),
            rib_spacing=rng.uniform(0.050, 0.066),
            rib_curve=rng.uniform(0.6, 1.2),
            clavicle_angle=rng.uniform(8, 22),
            spine_width=rng.uniform(0.045, 0.065),
            soft_tissue=rng.uniform(0.38, 0.52),
            device=str(rng.choice(["pacemaker", "port"])) if rng.random() < 0.18 else None,
            texture_seed=int(rng.integers(2**31)),
            female=female,
        )


def render_chest(a: ChestAnatomy, visit: int, rng: Rng, size: int) -> Image:
    """A PA chest radiograph: relative attenuation in [0, 1] (bone and devices bright)."""
    s = float(size)
    img = np.full((size, size), 0.04, dtype=np.float32)
    growth = 1.0 + 0.012 * visit  # slow change over the years: heart and habitus
    body_w, body_h = a.thorax[0] * s * growth**0.5, a.thorax[1] * s
    ellipse(img, (s / 2, s * 0.55), (body_w, body_h * 1.1), 0, a.soft_tissue)
    if a.female:
        for side in (-1, 1):
            ellipse(
                img,
                (s / 2 + side * body_w * 0.55, s * 0.78),
                (body_w * 0.35, s * 0.12),
                0,
                a.soft_tissue + 0.07,
            )
    texture_rng = np.random.default_rng(a.texture_seed)
    vessels = (
        smooth_field(texture_rng, (size, size), 24) * 0.5
        + smooth_field(texture_rng, (size, size), 48) * 0.5
    )
    lungs = np.zeros_like(img)
    for (cx, cy, ax, ay, tilt), shape in zip(a.lungs, a.lung_shape, strict=True):
        contour = harmonic_contour(
            (cx * s, cy * s),
            ay * s,
            shape[:3],
            shape[3:] * 30,
            aspect=ax / ay,
            angle=math.radians(tilt),
        )
        fill(lungs, contour, 1.0)
    # diaphragm domes cut the lung bases
    xs = np.arange(size, dtype=np.float32)
    for side, height in ((0, a.diaphragm[0]), (1, a.diaphragm[1])):
        half = slice(0, size // 2) if side == 0 else slice(size // 2, size)
        centre = s * (0.32 if side == 0 else 0.68)
        dome = height * s - 0.06 * s * np.cos((xs[half] - centre) / (0.2 * s)).clip(0, 1)
        rows = np.arange(size, dtype=np.float32)[:, None]
        lungs[:, half] *= (rows < dome[None, :]).astype(np.float32)
    img = (img * (1 - lungs) + lungs * (0.12 + 0.06 * vessels)).astype(np.float32)
    # heart and mediastinum over the lungs
    hx, hy, hax, hay, htilt = a.heart
    ellipse(img, (hx * s, hy * s), (hax * s * growth, hay * s * growth), htilt, 0.58)
    cv2.rectangle(
        img,
        (round(s / 2 - a.spine_width * s), round(0.12 * s)),
        (round(s / 2 + a.spine_width * s), round(0.95 * s)),
        0.60,
        -1,
    )
    for level in np.arange(0.14, 0.92, a.rib_spacing * 0.9):
        ellipse(
            img, (s / 2, level * s), (a.spine_width * s * 0.9, a.rib_spacing * s * 0.32), 0, 0.72
        )
    # posterior ribs: arcs from the spine, outward and down
    ribs = np.zeros_like(img)
    for i in range(10):
        y = (0.20 + i * a.rib_spacing) * s
        for side in (-1, 1):
            rib_centre = (s / 2 + side * 0.16 * s, y + 0.05 * s * a.rib_curve)
            cv2.ellipse(
                ribs,
                (round(rib_centre[0]), round(rib_centre[1])),
                (round(0.17 * s), round(0.06 * s * a.rib_curve)),
                0,
                180,
                360,
                1.0,
                max(2, round(0.011 * s)),
                lineType=cv2.LINE_AA,
            )
    thorax = np.zeros_like(img)
    ellipse(thorax, (s / 2, s * 0.55), (body_w * 0.95, body_h * 1.05), 0, 1.0)
    img += 0.10 * ribs * thorax
    for side in (-1, 1):
        angle = math.radians(a.clavicle_angle)
        start = (round(s / 2 + side * 0.03 * s), round(0.22 * s))
        end = (round(s / 2 + side * 0.26 * s), round(0.22 * s - side * side * 0.2 * s * angle))
        cv2.line(img, start, end, 0.75, max(3, round(0.018 * s)), lineType=cv2.LINE_AA)
    if a.device == "pacemaker":
        cv2.rectangle(
            img, (round(0.22 * s), round(0.20 * s)), (round(0.30 * s), round(0.26 * s)), 0.97, -1
        )
        cv2.polylines(
            img,
            [np.array([[0.26 * s, 0.23 * s], [0.40 * s, 0.30 * s], [hx * s, hy * s]], np.int32)],
            False,
            0.9,
            2,
        )
    elif a.device == "port":
        ellipse(img, (0.30 * s, 0.24 * s), (0.02 * s, 0.02 * s), 0, 0.95)
        cv2.polylines(
            img,
            [
                np.array(
                    [[0.30 * s, 0.24 * s], [0.47 * s, 0.30 * s], [0.49 * s, 0.45 * s]], np.int32
                )
            ],
            False,
            0.85,
            2,
        )
    img = blur(img, 1.2 * s / 512)
    # the visit: positioning, exposure, noise
    img = Pose.draw(rng, rotation=4.0, scale=0.05, shift=0.04).apply(img, 0.04)
    gamma = rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.85, 1.1)
    img = np.clip(img, 0, 1) ** gamma * gain + rng.uniform(-0.03, 0.03)
    img += rng.normal(0, rng.uniform(0.008, 0.025), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- CT (abdomen)


@dataclass(frozen=True)
class AbdomenAnatomy:
    body: tuple[float, float]  # half-axes (fraction)
    body_shape: npt.NDArray[np.float64]
    fat: float  # subcutaneous fat thickness (fraction)
    liver: tuple[float, float, float, float]  # cx, cy, ax, ay
    liver_shape: npt.NDArray[np.float64]
    spleen: tuple[float, float, float]
    kidneys: tuple[float, float, float]  # dx from centre, cy, size
    spine: tuple[float, float]  # cy, radius
    aorta: tuple[float, float]
    z_start: float
    bowel_seed: int
    organ_hu: tuple[float, float, float]  # liver, spleen, kidney

    @classmethod
    def draw(cls, rng: Rng) -> AbdomenAnatomy:
        return cls(
            body=(rng.uniform(0.33, 0.44), rng.uniform(0.24, 0.32)),
            body_shape=rng.uniform(-0.03, 0.03, size=8),
            fat=rng.uniform(0.015, 0.06),
            liver=(
                rng.uniform(0.33, 0.38),
                rng.uniform(0.40, 0.46),
                rng.uniform(0.10, 0.15),
                rng.uniform(0.09, 0.13),
            ),
            liver_shape=rng.uniform(-0.08, 0.08, size=8),
            spleen=(rng.uniform(0.66, 0.72), rng.uniform(0.42, 0.50), rng.uniform(0.035, 0.055)),
            kidneys=(rng.uniform(0.11, 0.15), rng.uniform(0.56, 0.62), rng.uniform(0.035, 0.05)),
            spine=(rng.uniform(0.62, 0.68), rng.uniform(0.035, 0.05)),
            aorta=(rng.uniform(0.52, 0.56), rng.uniform(0.013, 0.02)),
            z_start=rng.uniform(0.0, 0.2),
            bowel_seed=int(rng.integers(2**31)),
            organ_hu=(rng.uniform(50, 70), rng.uniform(40, 55), rng.uniform(25, 40)),
        )


def series_pose(rng: Rng, modality: str) -> Pose:
    """The patient's position for a whole series: slices of one series share it."""
    if modality == "ct":
        return Pose.draw(rng, rotation=3.0, scale=0.03, shift=0.03)
    return Pose.draw(rng, rotation=6.0, scale=0.04, shift=0.04)


def render_ct(
    a: AbdomenAnatomy, z: float, contrast: bool, rng: Rng, size: int, pose: Pose
) -> Image:
    """An axial abdominal CT slice at relative level ``z`` (0 = dome of the liver), in HU."""
    s = float(size)
    img = np.full((size, size), -1000.0, dtype=np.float32)
    cx, cy = s / 2, s * 0.5
    # The trunk's cross-section changes along its length: the lower chest is deep, the
    # abdomen wide and the pelvis wider and flatter.
    half_w = a.body[0] * (0.88 + 0.30 * z)
    half_h = a.body[1] * (1.12 - 0.30 * z)
    shape = a.body_shape[:4] * (1.0 + 1.0 * z)
    phases = a.body_shape[4:] * 40 + 2.0 * z
    outline = harmonic_contour((cx, cy), half_h * s, shape, phases, aspect=half_w / half_h)
    fill(img, outline, -100.0)  # subcutaneous fat
    fat = a.fat * (0.7 + 0.8 * z)
    inner = harmonic_contour(
        (cx, cy), (half_h - fat) * s, shape, phases, aspect=(half_w - fat) / (half_h - fat)
    )
    fill(img, inner, 45.0)  # muscle wall
    cavity = harmonic_contour(
        (cx, cy),
        (half_h - fat - 0.02) * s,
        shape,
        phases,
        aspect=(half_w - fat - 0.02) / (half_h - fat - 0.02),
    )
    cavity_mask = mask_of(img.shape, cavity)
    # bowel: soft tissue with gas pockets; the gas moves between visits
    bowel_rng = np.random.default_rng(a.bowel_seed)
    bowel = 20.0 + 25.0 * smooth_field(bowel_rng, img.shape, 12)
    gas = smooth_field(rng, img.shape, 20) > 0.55
    bowel = np.where(gas, -900.0, bowel).astype(np.float32)
    img = img * (1 - cavity_mask) + bowel * cavity_mask
    boost = 40.0 if contrast else 0.0
    liver_scale = max(0.0, 1.0 - 1.6 * max(0.0, z - 0.35))
    if liver_scale > 0.05:
        lx, ly, lax, lay = a.liver
        contour = harmonic_contour(
            (lx * s, ly * s),
            lay * s * liver_scale,
            a.liver_shape[:4],
            a.liver_shape[4:] * 30,
            aspect=lax / lay,
        )
        fill(img, contour, a.organ_hu[0] + boost)
    if z < 0.55:
        sx, sy, sr = a.spleen
        ellipse(img, (sx * s, sy * s), (sr * s * 1.3, sr * s), 30, a.organ_hu[1] + boost)
    if 0.3 < z < 0.95:
        kx, ky, kr = a.kidneys
        for side in (-1, 1):
            ellipse(
                img,
                (cx + side * kx * s, ky * s),
                (kr * s * 0.8, kr * s * 1.2),
                side * 20,
                a.organ_hu[2] + (150.0 if contrast else 0.0),
            )
    if z < 0.15:  # lung bases posteriorly
        for side in (-1, 1):
            ellipse(img, (cx + side * 0.2 * s, cy + 0.12 * s), (0.1 * s, 0.06 * s), 0, -850.0)
    if z > 0.6:  # iliac wings
        for side in (-1, 1):
            ellipse(
                img,
                (cx + side * (half_w * 0.55) * s, cy + 0.05 * s),
                (0.25 * s * (z - 0.3), 0.025 * s),
                side * 35,
                500.0,
            )
    spine_y, spine_r = a.spine
    ellipse(img, (cx, spine_y * s), (spine_r * s, spine_r * s * 0.9), 0, 700.0)
    ellipse(img, (cx, spine_y * s), (spine_r * s * 0.75, spine_r * s * 0.65), 0, 250.0)
    cv2.rectangle(
        img,
        (round(cx - 0.008 * s), round(spine_y * s + spine_r * s)),
        (round(cx + 0.008 * s), round(spine_y * s + 2.2 * spine_r * s)),
        600.0,
        -1,
    )
    ay, ar = a.aorta
    ellipse(img, (cx - 0.02 * s, ay * s), (ar * s, ar * s), 0, 200.0 if contrast else 40.0)
    img = blur(img, 0.8 * s / 512)
    # the visit: table height, centring, a little rotation; then the table and noise
    img = pose.apply(img, -1000.0)
    table_y = round(s * (0.5 + a.body[1] * 1.12 + 0.03 + pose.shift[1]))
    if table_y < size - 2:
        cv2.line(img, (0, table_y), (size - 1, table_y), 150.0, max(2, round(0.008 * s)))
    img += rng.normal(0, rng.uniform(8, 22), img.shape).astype(np.float32)
    return img.astype(np.float32)
