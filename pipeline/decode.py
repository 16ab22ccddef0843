"""Decode: a pydicom dataset to float pixels in [0, 1] with the DICOM semantics applied.

Order, as PS3.3 C.11 defines the grey pipeline: stored values -> Modality LUT (Rescale
Slope / Intercept or a Modality LUT Sequence) -> VOI LUT (a VOI LUT Sequence, or a window,
else a robust automatic window) -> MONOCHROME1 inversion. Colour: palette colour through its
LUTs, YBR through pydicom's conversion to RGB. Enhanced (functional group) attributes are read
per frame. Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from pipeline.records import DecodedImage, FloatImage, StageError

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
COLOUR_PHOTOMETRICS = {
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_PARTIAL_422",
    "YBR_ICT",
    "YBR_RCT",
}
GREY_PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2"}


@dataclass(frozen=True)
class DecodeParams:
    frames: str = "middle"  # "first", "middle" or "all"
    max_frames: int = 16
    auto_window_percentiles: tuple[float, float] = (0.5, 99.5)
    # the most a dataset may hold once inflated or decompressed (scp.max_dataset_mb)
    max_bytes: int = 512 * 1024 * 1024


def declared_pixel_bytes(ds: Dataset) -> int:
    """What the Pixel Data takes decoded, by its description: Rows x Columns x frames x
    samples x bytes per sample; a compressed image's frames never need more."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return int(ds.Rows) * int(ds.Columns) * number_of_frames(ds) * samples * max(1, (bits + 7) // 8)


def choose_frames(total: int, policy: str, max_frames: int) -> tuple[int, ...]:
    """The frame indices analysed for a stack of ``total`` frames."""
    if total < 1:
        raise StageError(f"Number of Frames is {total}")
    if policy == "first":
        return (0,)
    if policy == "middle":
        return (total // 2,)
    if policy == "all":
        if total <= max_frames:
            return tuple(range(total))
        picks = np.linspace(0, total - 1, max_frames).round().astype(int)
        return tuple(sorted({int(i) for i in picks}))
    raise ValueError(f"unknown frame policy {policy!r}")


def number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        return max(int(value or 1), 1)
    except (TypeError, ValueError):
        raise StageError(f"Number of Frames {value!r} is not an integer") from None


def frame_attributes(ds: Dataset, index: int) -> Dataset:
    """Rescale and window attributes for one frame: the top level, overridden by the shared
    then the per-frame functional groups of an enhanced image."""
    merged = Dataset()
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            setattr(merged, keyword, ds[keyword].value)
    if "VOILUTFunction" in ds:
        merged.VOILUTFunction = ds.VOILUTFunction
    groups: list[Dataset] = []
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for seq_keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = group.get(seq_keyword)
            if seq:
                for element in seq[0]:
                    if element.keyword in (
                        "RescaleSlope",
                        "RescaleIntercept",
                        "WindowCenter",
                        "WindowWidth",
                        "VOILUTFunction",
                    ):
                        setattr(merged, element.keyword, element.value)
    return merged


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS/IS element."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def apply_window(values: FloatImage, center: float, width: float, function: str) -> FloatImage:
    """Map modality values to [0, 1] by a VOI window (PS3.3 C.11.2.1.2)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    elif function == "LINEAR_EXACT":
        out = (values - center) / max(width, 1e-6) + 0.5
    else:  # LINEAR
        out = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def auto_window(values: FloatImage, percentiles: tuple[float, float]) -> FloatImage:
    low, high = np.percentile(values, percentiles)
    if high <= low:
        high = float(values.max())
        low = float(values.min())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _grey_frame(stored: np.ndarray, ds: Dataset, index: int, params: DecodeParams) -> FloatImage:
    attrs = frame_attributes(ds, index)
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(stored, ds).astype(np.float32)
    else:
        slope = _first(attrs.get("RescaleSlope", 1.0) or 1.0)
        intercept = _first(attrs.get("RescaleIntercept", 0.0) or 0.0)
        values = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float32).reshape(-1)
        # The LUT is indexed by integer modality values.
        indexable = np.rint(values).astype(np.int64)
        out = apply_voi_lut(indexable, ds, prefer_lut=True).astype(np.float32)
        low, high = float(lut.min()), float(lut.max())
        grey = np.clip((out - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)
    elif "WindowCenter" in attrs and "WindowWidth" in attrs:
        grey = apply_window(
            values,
            _first(attrs.WindowCenter),
            _first(attrs.WindowWidth),
            str(attrs.get("VOILUTFunction", "LINEAR")),
        )
    else:
        grey = auto_window(values, params.auto_window_percentiles)

    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = (1.0 - grey).astype(np.float32)
    return grey


def _palette_luts(ds: Dataset) -> Dataset:
    """The palette's LUTs in the byte order pydicom reads them in.

    pydicom reads non-segmented Palette Color LUT Data as little-endian words, whatever the
    dataset's byte order: a Big Endian dataset's 16-bit entries come out byte-swapped, and
    its colours wrong. Those are swapped here first."""
    if (
        ds.original_encoding[1] is not False  # little endian, as pydicom assumes
        or "SegmentedRedPaletteColorLookupTableData" in ds  # read by the byte order
    ):
        return ds
    luts = Dataset()
    if "PixelRepresentation" in ds:
        luts.PixelRepresentation = ds.PixelRepresentation
    for colour in ("Red", "Green", "Blue", "Alpha"):
        descriptor = f"{colour}PaletteColorLookupTableDescriptor"
        data = f"{colour}PaletteColorLookupTableData"
        if descriptor in ds:
            luts[descriptor] = ds[descriptor]
        if data in ds:
            raw = bytes(ds[data].value)
            entries = int(ds[descriptor].value[0] or 2**16) if descriptor in ds else 0
            if entries and len(raw) == 2 * entries:  # 16-bit entries
                raw = np.frombuffer(raw, dtype=">u2").astype("<u2").tobytes()
            setattr(luts, data, raw)
    return luts


def _colour_frame(decoded: np.ndarray, ds: Dataset, photometric: str) -> FloatImage:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(decoded, _palette_luts(ds))
        full_scale = 65535.0 if rgb.dtype.itemsize > 1 else 255.0
        return (rgb.astype(np.float32) / np.float32(full_scale)).astype(np.float32)
    bits = int(ds.get("BitsStored", 8) or 8)
    full_scale = float(2**bits - 1)
    return np.clip(decoded.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)


def decode_dataset(ds: Dataset, params: DecodeParams) -> DecodedImage:
    """Decode the chosen frames of ``ds``; raise :class:`StageError` with a reason if it can't."""
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise StageError("the dataset has no Pixel Data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper().strip()
    if not photometric:
        raise StageError("Photometric Interpretation is missing")
    if photometric not in GREY_PHOTOMETRICS | COLOUR_PHOTOMETRICS | {"PALETTE COLOR"}:
        raise StageError(f"unsupported Photometric Interpretation {photometric}")
    for keyword in ("Rows", "Columns"):
        if not ds.get(keyword):
            raise StageError(f"{keyword} is missing or zero")

    total = number_of_frames(ds)
    declared = declared_pixel_bytes(ds)
    if declared > params.max_bytes:
        # refused before any decoder allocates it
        raise StageError(
            f"the pixel data would decode to {declared} bytes, over {params.max_bytes}"
        )
    indices = choose_frames(total, params.frames, params.max_frames)
    frames: list[FloatImage] = []
    for index in indices:
        try:
            decoded = pixel_array(ds, index=index)
        except Exception as exc:  # any decoder failure is a reason, not a crash
            raise StageError(f"cannot decode frame {index}: {type(exc).__name__}: {exc}") from exc
        if photometric in GREY_PHOTOMETRICS:
            if decoded.ndim != 2:
                raise StageError(f"grey frame {index} has shape {decoded.shape}")
            frames.append(_grey_frame(decoded, ds, index, params))
        else:
            frame = _colour_frame(decoded, ds, photometric)
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise StageError(f"colour frame {index} has shape {frame.shape}")
            frames.append(frame)
    stack = np.stack(frames).astype(np.float32)
    if not np.isfinite(stack).all():
        raise StageError("decoded pixels contain NaN or infinity")
    return DecodedImage(
        frames=stack, frames_total=total, frames_analysed=indices, photometric=photometric
    )
