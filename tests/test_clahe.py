"""CLAHE on tiny arrays with reference values."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.clahe import ClaheParams, apply_clahe, apply_clahe_frames

# With one tile and a clip limit too high to clip, CLAHE is plain histogram equalisation:
# each level maps to 255 * (cumulative count / total), rounded.
EQUALISE = ClaheParams(clip_limit=1000.0, tile_grid=(1, 1))


def test_two_levels_equalise_to_half_and_full_scale() -> None:
    image = np.full((8, 8), 51 / 255, dtype=np.float32)
    image[:, 4:] = 102 / 255
    out = apply_clahe(image, EQUALISE)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, :4], 128 / 255, atol=1e-6)
    np.testing.assert_allclose(out[:, 4:], 1.0, atol=1e-6)


def test_four_levels_equalise_to_quarters() -> None:
    levels_in = np.array([10, 20, 30, 40], dtype=np.float32) / np.float32(255)
    image = np.repeat(levels_in, 16).reshape(8, 8).astype(np.float32)
    out = apply_clahe(image, EQUALISE)
    levels = sorted({round(float(v) * 255) for v in out.ravel()})
    assert levels == [64, 128, 191, 255]


def test_clipping_limits_the_contrast_gain() -> None:
    rng = np.random.default_rng(0)
    image = (0.45 + 0.1 * rng.random((64, 64))).astype(np.float32)  # low contrast
    gentle = apply_clahe(image, ClaheParams(clip_limit=1.0, tile_grid=(4, 4)))
    strong = apply_clahe(image, ClaheParams(clip_limit=40.0, tile_grid=(4, 4)))
    assert float(image.std()) < float(gentle.std()) < float(strong.std())


def test_colour_keeps_grey_pixels_grey() -> None:
    rng = np.random.default_rng(1)
    level = rng.random((16, 16)).astype(np.float32)
    rgb = np.repeat(level[:, :, np.newaxis], 3, axis=2)
    out = apply_clahe(rgb, ClaheParams())
    assert out.shape == (16, 16, 3)
    assert np.abs(out[:, :, 0] - out[:, :, 1]).max() <= 2 / 255
    assert np.abs(out[:, :, 1] - out[:, :, 2]).max() <= 2 / 255


def test_frames_are_enhanced_one_by_one() -> None:
    frames = np.stack([np.full((4, 4), 0.2), np.full((4, 4), 0.8)]).astype(np.float32)
    out = apply_clahe_frames(frames, ClaheParams())
    assert out.shape == frames.shape
    np.testing.assert_allclose(out[0], apply_clahe(frames[0], ClaheParams()))


def test_other_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="grey or RGB"):
        apply_clahe(np.zeros((4, 4, 2), dtype=np.float32), ClaheParams())
