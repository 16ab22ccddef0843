"""Rendering of synthetic anatomy: per-patient parameters that persist across visits, and
per-visit variation (pose, exposure, noise, slice position, slow change over time).

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


# --------------------------------------------------------------------------- brain MRI


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


# --------------------------------------------------------------------------- dermoscopy


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
