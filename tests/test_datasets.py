"""The dataset reader, the raw-pixel baseline and the augmentation export."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.runner import PipelineConfig
from synthetic.hospital import SynthOptions, generate
from training.baseline import raw_pixel_baseline
from training.datasets.augment import AugmentParams, augment, export_augmented
from training.datasets.reader import load_image, scan

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate(SynthOptions(out=out, patients=4, visits=2, seed=9, slices=2))
    return out


def test_scan_follows_the_dataset_layout(small: Path) -> None:
    items = scan(small)
    assert {i.modality for i in items} == {"xray", "ct", "mri", "dermoscopy"}
    assert len({i.patient_id for i in items if i.modality == "ct"}) == 4
    assert all(i.path.parent.name == i.patient_id for i in items)
    assert {i.visit for i in items} == {"v1", "v2"}
    assert len(scan(small, ["mri"])) == 4 * 2 * 2


def test_images_go_through_decode_and_clahe(small: Path) -> None:
    config = PipelineConfig()
    dcm = load_image(next((small / "ct").rglob("*.dcm")), config)
    assert dcm.shape == (512, 512) and dcm.dtype == np.float32
    rgb = load_image(next((small / "dermoscopy").rglob("*.dcm")), config)
    assert rgb.shape == (384, 384, 3)
    png = small / "picture.png"
    cv2.imwrite(str(png), (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64))
    assert load_image(png, config).shape == (64, 64)


def test_baseline_on_generated_data(small: Path) -> None:
    results = {r.modality: r for r in raw_pixel_baseline(small, size=32)}
    assert set(results) == {"xray", "ct", "mri", "dermoscopy"}
    for result in results.values():
        assert result.n_patients == 4 and result.unreadable == 0
        assert 0.0 <= result.p_at_1 <= 1.0 and 0.0 <= result.roc_auc <= 1.0


@pytest.mark.skipif(not REAL.is_dir(), reason="the real image set is not beside this checkout")
def test_reads_the_real_images_as_they_are() -> None:
    items = scan(REAL)
    assert {"xray", "ct", "mri"} <= {i.modality for i in items}
    config = PipelineConfig()
    for modality in ("xray", "ct", "mri"):
        item = next(i for i in items if i.modality == modality)
        image = load_image(item.path, config)
        assert image.ndim == 2 and image.std() > 0


def test_augment_is_the_seed_recipe_and_deterministic() -> None:
    image = np.zeros((40, 40), dtype=np.float32)
    image[10:30, 5:15] = 1.0
    params = AugmentParams(rotation_deg=0.0, zoom=0.0, horizontal_flip=True, brightness=None)
    flips = {
        augment(image, params, np.random.default_rng(s))[:, :20].sum() > 100 for s in range(20)
    }
    assert flips == {True, False}  # about half the draws are mirrored
    bright = AugmentParams(rotation_deg=15, zoom=0.1, brightness=(0.5, 0.6))
    out = augment(image, bright, np.random.default_rng(0))
    assert out.max() <= 0.6 + 1e-6
    a = augment(image, bright, np.random.default_rng(1))
    b = augment(image, bright, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)


def test_export_writes_n_per_class_at_the_size(small: Path, tmp_path: Path) -> None:
    source = small / "xray"
    written = export_augmented(source, tmp_path / "aug", per_class=7, size=50, seed=1)
    assert len(written) == 4 and set(written.values()) == {7}
    files = sorted((tmp_path / "aug").rglob("*.png"))
    assert len(files) == 28
    first = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert first is not None and first.shape == (50, 50)
    export_augmented(source, tmp_path / "again", per_class=7, size=50, seed=1)
    again = sorted((tmp_path / "again").rglob("*.png"))
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]
