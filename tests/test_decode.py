"""The decode stage on tiny arrays with reference values, and on the pydicom test corpus."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from benchmarks.attacks import write_deflate_bomb
from pipeline.decode import DecodeParams, choose_frames, decode_dataset
from pipeline.records import StageError
from pipeline.runner import PipelineConfig, run_pipeline
from support.corpus import corpus_file
from support.dicom_factory import make_dataset

MIDDLE = DecodeParams(frames="middle")


def grey(ds: Dataset, params: DecodeParams = MIDDLE) -> np.ndarray:
    image = decode_dataset(ds, params)
    assert image.frames.dtype == np.float32
    return image.frames[0]


STORED = np.array([[0, 100], [200, 300]], dtype=np.uint16)


def test_rescale_then_linear_window() -> None:
    # values = 2 * stored - 100 = [-100, 100, 300, 500]; window C=200, W=401 (PS3.3 C.11.2.1.2)
    ds = make_dataset(
        STORED, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=401
    )
    np.testing.assert_allclose(grey(ds), [[0.0, 0.25125], [0.75125, 1.0]], atol=1e-6)


def test_monochrome1_is_inverted_after_the_window() -> None:
    ds = make_dataset(
        STORED,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=200,
        WindowWidth=401,
    )
    np.testing.assert_allclose(grey(ds), [[1.0, 0.74875], [0.24875, 0.0]], atol=1e-6)


def test_without_a_window_the_robust_range_is_used() -> None:
    # percentiles 0.5 / 99.5 of [0, 100, 200, 300] are 1.5 and 298.5
    np.testing.assert_allclose(
        grey(make_dataset(STORED)), [[0.0, 0.331650], [0.668350, 1.0]], atol=1e-6
    )


def test_sigmoid_window() -> None:
    ds = make_dataset(STORED, WindowCenter=150, WindowWidth=100, VOILUTFunction="SIGMOID")
    expected = 1.0 / (1.0 + np.exp(-4.0 * (STORED.astype(float) - 150) / 100))
    np.testing.assert_allclose(grey(ds), expected, atol=1e-6)


def test_voi_lut_sequence_takes_precedence_over_the_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 50, 100, 255]
    ds = make_dataset(
        np.array([[0, 1], [2, 3]], dtype=np.uint16),
        VOILUTSequence=Sequence([item]),
        WindowCenter=1,
        WindowWidth=1,
    )
    np.testing.assert_allclose(grey(ds), [[0.0, 50 / 255], [100 / 255, 1.0]], atol=1e-6)


def test_signed_pixels_with_intercept() -> None:
    stored = np.array([[-1000, 0], [1000, 2000]], dtype=np.int16)
    ds = make_dataset(stored, RescaleIntercept=-24, WindowCenter=0, WindowWidth=2001)
    values = stored.astype(float) - 24
    expected = np.clip((values + 0.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(grey(ds), expected, atol=1e-6)


def test_rgb_is_scaled_by_its_bit_depth() -> None:
    rgb = np.array([[[255, 0, 0], [0, 128, 255]]], dtype=np.uint8)
    image = decode_dataset(make_dataset(rgb, photometric="RGB"), MIDDLE)
    assert image.is_colour
    np.testing.assert_allclose(image.frames[0], rgb / 255.0, atol=1e-6)


def test_ybr_full_becomes_rgb() -> None:
    # Y=128, Cb=Cr=128 is mid grey; Y=76, Cb=85, Cr=255 is (nearly) pure red.
    ybr = np.array([[[128, 128, 128], [76, 85, 255]]], dtype=np.uint8)
    image = decode_dataset(make_dataset(ybr, photometric="YBR_FULL"), MIDDLE)
    np.testing.assert_allclose(image.frames[0, 0, 0], [128 / 255] * 3, atol=2 / 255)
    np.testing.assert_allclose(image.frames[0, 0, 1], [1.0, 0.0, 0.0], atol=3 / 255)


def test_palette_colour_goes_through_its_lookup_tables() -> None:
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    ds = make_dataset(indices, photometric="PALETTE COLOR", modality="OT")
    for colour, entries in (
        ("Red", [0, 65535, 0, 0]),
        ("Green", [0, 0, 65535, 0]),
        ("Blue", [0, 0, 0, 65535]),
    ):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(entries, "<u2").tobytes())
    image = decode_dataset(ds, MIDDLE)
    expected = np.array([[[0, 0, 0], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]], dtype=np.float32)
    np.testing.assert_allclose(image.frames[0], expected, atol=1e-6)


@pytest.mark.parametrize("name", ["OBXXXX1A_expb.dcm", "OBXXXX1A_expb_2frame.dcm"])
def test_a_big_endian_palette_has_the_colours_of_its_little_endian_twin(name: str) -> None:
    # pydicom reads Palette Color LUT Data as little-endian words whatever the syntax
    big = decode_dataset(pydicom.dcmread(corpus_file(name)), MIDDLE)
    little = decode_dataset(pydicom.dcmread(corpus_file(name.replace("_expb", ""))), MIDDLE)
    assert big.photometric == little.photometric == "PALETTE COLOR"
    np.testing.assert_array_equal(big.frames, little.frames)
    assert float(big.frames.std()) > 0.05  # colours, not a blank


def test_multiframe_middle_frame_is_chosen() -> None:
    frames = np.stack([np.full((2, 2), 1000 * i, dtype=np.uint16) for i in range(5)])
    ds = make_dataset(frames, WindowCenter=5000, WindowWidth=10001)
    image = decode_dataset(ds, MIDDLE)
    assert image.frames_total == 5
    assert image.frames_analysed == (2,)
    np.testing.assert_allclose(image.frames[0], (2000 - 4999.5) / 10000 + 0.5, atol=1e-6)


def test_multiframe_all_frames_evenly_capped() -> None:
    frames = np.stack([np.full((2, 2), i, dtype=np.uint16) for i in range(10)])
    image = decode_dataset(make_dataset(frames), DecodeParams(frames="all", max_frames=4))
    assert image.frames_analysed == (0, 3, 6, 9)
    assert image.frames.shape == (4, 2, 2)


@pytest.mark.parametrize(
    ("total", "policy", "cap", "expected"),
    [
        (1, "middle", 16, (0,)),
        (7, "middle", 16, (3,)),
        (7, "first", 16, (0,)),
        (3, "all", 16, (0, 1, 2)),
        (100, "all", 3, (0, 50, 99)),
    ],
)
def test_choose_frames(total: int, policy: str, cap: int, expected: tuple[int, ...]) -> None:
    assert choose_frames(total, policy, cap) == expected


def test_enhanced_per_frame_functional_groups_are_applied() -> None:
    frames = np.stack([np.full((2, 2), 100, dtype=np.uint16)] * 2)
    shared = Dataset()
    transform = Dataset()
    transform.RescaleSlope = 1
    transform.RescaleIntercept = 0
    shared.PixelValueTransformationSequence = Sequence([transform])
    per_frame = []
    for center in (100, 0):
        group = Dataset()
        voi = Dataset()
        voi.WindowCenter = center
        voi.WindowWidth = 101
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds = make_dataset(
        frames,
        SharedFunctionalGroupsSequence=Sequence([shared]),
        PerFrameFunctionalGroupsSequence=Sequence(per_frame),
    )
    image = decode_dataset(ds, DecodeParams(frames="all"))
    np.testing.assert_allclose(image.frames[0], 0.5 + 0.5 / 100, atol=1e-6)
    np.testing.assert_allclose(image.frames[1], 1.0, atol=1e-6)


def test_missing_pixel_data_is_a_reason_not_a_crash() -> None:
    ds = make_dataset(STORED)
    del ds.PixelData
    with pytest.raises(StageError, match="no Pixel Data"):
        decode_dataset(ds, MIDDLE)


def test_pixel_data_shorter_than_rows_times_columns() -> None:
    ds = make_dataset(STORED)
    ds.Rows = 64
    with pytest.raises(StageError, match="cannot decode frame 0"):
        decode_dataset(ds, MIDDLE)


def test_unsupported_photometric_interpretation() -> None:
    ds = make_dataset(STORED)
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(StageError, match="unsupported Photometric Interpretation HSV"):
        decode_dataset(ds, MIDDLE)


@pytest.mark.parametrize(
    "compressed",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_syntaxes_decode_to_the_same_pixels(compressed: str) -> None:
    reference = decode_dataset(pydicom.dcmread(corpus_file("MR_small.dcm")), MIDDLE)
    other = decode_dataset(pydicom.dcmread(corpus_file(compressed)), MIDDLE)
    np.testing.assert_array_equal(reference.frames, other.frames)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", (1, 100, 100, 3)),
        ("SC_rgb_rle.dcm", (1, 100, 100, 3)),
        ("JPEG2000.dcm", (1, 1024, 256)),
        ("JPEGLSNearLossless_08.dcm", (1, 45, 10)),
        ("emri_small_jpeg_2k_lossless.dcm", (1, 64, 64)),
        ("SC_ybr_full_uncompressed.dcm", (1, 100, 100, 3)),
        ("SC_ybr_full_422_uncompressed.dcm", (1, 100, 100, 3)),
        ("image_dfl.dcm", (1, 512, 512)),
        ("emri_small_RLE.dcm", (1, 64, 64)),
    ],
)
def test_compressed_and_colour_files_decode(name: str, shape: tuple[int, ...]) -> None:
    image = decode_dataset(pydicom.dcmread(corpus_file(name)), MIDDLE)
    assert image.frames.shape == shape
    assert float(image.frames.min()) >= 0.0 and float(image.frames.max()) <= 1.0


def test_pixel_data_declared_larger_than_the_cap_is_refused_before_decoding() -> None:
    ds = make_dataset(np.zeros((2, 4, 4), dtype=np.uint16))  # 2 x 4 x 4 x 2 bytes = 64
    assert grey(ds, DecodeParams(max_bytes=64)).shape == (4, 4)
    ds.Rows = ds.Columns = 60000  # what a compressed frame may claim and a decoder allocate
    with pytest.raises(StageError, match="would decode to 14400000000 bytes, over 64"):
        decode_dataset(ds, DecodeParams(max_bytes=64))


def test_a_deflate_bomb_in_the_spool_is_a_recorded_failure_not_an_allocation(
    tmp_path: Path,
) -> None:
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", inflated_bytes=256 * 1024 * 1024)
    started = time.monotonic()
    result = run_pipeline(bomb, PipelineConfig(decode=DecodeParams(max_bytes=16 * 1024 * 1024)))
    assert (result.failed_stage, result.failure_reason) == (
        "read",
        f"the dataset inflates past {16 * 1024 * 1024} bytes",
    )
    assert time.monotonic() - started < 5
    missing = run_pipeline(tmp_path / "gone.dcm", PipelineConfig())
    assert missing.failure_reason == "the spooled file is missing"  # no path: users see it
