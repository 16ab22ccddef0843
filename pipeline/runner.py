"""The runner: composes the stages for one spooled instance and times each."""

from __future__ import annotations

import struct
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydicom import Dataset, dcmread

from pipeline.clahe import ClaheParams, apply_clahe_frames
from pipeline.decode import DecodeParams, decode_dataset
from pipeline.records import DecodedImage, FloatImage, IntensityStats, StageError

T = TypeVar("T")


@dataclass(frozen=True)
class PipelineConfig:
    decode: DecodeParams = field(default_factory=DecodeParams)
    clahe: ClaheParams = field(default_factory=ClaheParams)

    def as_parameters(self) -> dict[str, Any]:
        return {"decode": asdict(self.decode), "clahe": asdict(self.clahe)}


@dataclass(frozen=True)
class PipelineResult:
    timings_ms: dict[str, float]
    decoded: DecodedImage | None = None
    enhanced: FloatImage | None = None
    failed_stage: str | None = None
    failure_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed_stage is None

    def stats(self) -> tuple[IntensityStats | None, IntensityStats | None]:
        before = IntensityStats.of(self.decoded.frames) if self.decoded is not None else None
        after = IntensityStats.of(self.enhanced) if self.enhanced is not None else None
        return before, after


DEFLATED = b"1.2.840.10008.1.2.1.99"


def check_inflated_size(path: Path, max_bytes: int) -> None:
    """Where the file's syntax deflates its dataset, inflate it as a stream, keeping nothing,
    and raise StageError past ``max_bytes``: pydicom would inflate it whole, however large.

    Every file the worker reads passes here, so the syntax is found from the File Meta
    Information's bytes (its first element, the group length, gives its end) rather than by a
    second parse of the meta."""
    with path.open("rb") as file:
        head = file.read(144)
        # the meta group follows 'DICM', after the 128-byte preamble where there is one
        start = 132 if head[128:132] == b"DICM" else 4 if head[:4] == b"DICM" else None
        if start is None or head[start : start + 6] != b"\x02\x00\x00\x00UL":
            return  # no File Meta Information: not deflated
        file.seek(start + 8)
        (group_length,) = struct.unpack("<I", file.read(4))
        if DEFLATED not in file.read(group_length):
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        while chunk := file.read(1 << 20):
            while chunk:
                inflated += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
                if inflated > max_bytes:
                    raise StageError(f"the dataset inflates past {max_bytes} bytes")


def read_dataset(path: Path, max_bytes: int = DecodeParams.max_bytes) -> Dataset:
    """Read a spooled file. Failing to read is a StageError, not a crash; the reason names
    no path (it is shown to the console's users)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_inflated_size(path, max_bytes)
            return dcmread(path)
    except StageError:
        raise
    except FileNotFoundError:
        raise StageError("the spooled file is missing") from None
    except OSError as exc:
        raise StageError(f"cannot read the spooled file: {exc.strerror or 'I/O error'}") from None
    except zlib.error as exc:
        raise StageError(f"deflated data cannot be inflated: {exc}") from None
    except Exception as exc:
        raise StageError(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[stage] = round((time.perf_counter() - start) * 1000.0, 3)


def run_pipeline(path: Path, config: PipelineConfig) -> PipelineResult:
    """read -> decode -> CLAHE. Any stage's failure ends the run with its stage and reason."""
    return _run(lambda: read_dataset(path, config.decode.max_bytes), config)


def run_dataset(ds: Dataset, config: PipelineConfig) -> PipelineResult:
    """decode -> CLAHE of a dataset already in memory (a prior fetched from the PACS),
    exactly as a received image's."""
    return _run(lambda: ds, config)


def _run(read: Callable[[], Dataset], config: PipelineConfig) -> PipelineResult:
    timer = _Timer()
    decoded: DecodedImage | None = None
    stage = "read"
    try:
        ds = timer.run("read", read)
        stage = "decode"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = timer.run("decode", lambda: decode_dataset(ds, config.decode))
        stage = "clahe"
        frames = decoded.frames
        enhanced = timer.run("clahe", lambda: apply_clahe_frames(frames, config.clahe))
    except StageError as exc:
        return PipelineResult(
            timings_ms=timer.timings, decoded=decoded, failed_stage=stage, failure_reason=exc.reason
        )
    except Exception as exc:  # a bug or an input no stage foresaw: still a recorded failure
        return PipelineResult(
            timings_ms=timer.timings,
            decoded=decoded,
            failed_stage=stage,
            failure_reason=f"unexpected {type(exc).__name__}: {exc}",
        )
    return PipelineResult(timings_ms=timer.timings, decoded=decoded, enhanced=enhanced)
