"""A strict structural check of an encoded dataset, before we answer Success.

pydicom reads truncated or over-long elements leniently (it warns and keeps what it got);
a receiver must not acknowledge such data. This walks the element structure (tags, VRs,
lengths, sequences, items, encapsulated fragments) and fails on the first inconsistency. On the
way it keeps the values of the top-level elements asked for, so that the receiver need not
parse the dataset a second time for the few fields it indexes.
"""

from __future__ import annotations

import struct
import zlib

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}
MAX_DEPTH = 32


class MalformedDataset(ValueError):
    """The encoded dataset is not well formed; the message says where."""


class InflatesTooLarge(ValueError):
    """The dataset inflates past the largest we accept."""


def _size(count: int) -> str:
    return f"{count // (1 << 20)} MB" if count >= 1 << 20 else f"{count} bytes"


# Inflated this much at a time while a deflated dataset's size is checked.
INFLATE_STEP = 1 << 20


def inflate(data: bytes, max_bytes: int) -> bytes:
    """A Deflated syntax's dataset, inflated. Its size is found first by inflating it as a
    stream that keeps nothing, so that a small payload that would inflate to gigabytes is
    refused without ever taking more than a step's memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    view = memoryview(data)
    try:
        # fed a slice at a time, so that what is left over after each step stays small
        for start in range(0, len(view), INFLATE_STEP):
            pending: bytes | memoryview = view[start : start + INFLATE_STEP]
            while pending:
                size += len(inflater.decompress(pending, INFLATE_STEP))
                if size > max_bytes:
                    raise InflatesTooLarge(f"dataset inflates past {_size(max_bytes)}")
                pending = inflater.unconsumed_tail
        size += len(inflater.flush())
        if size > max_bytes:
            raise InflatesTooLarge(f"dataset inflates past {_size(max_bytes)}")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return inflater.decompress(data) + inflater.flush()
    except zlib.error as exc:
        raise MalformedDataset(f"deflated data cannot be inflated: {exc}") from None


class _Walker:
    def __init__(
        self, data: bytes, implicit: bool, little: bool, wanted: frozenset[int] = frozenset()
    ) -> None:
        self.data = data
        self.implicit = implicit
        self.endian = "<" if little else ">"
        self.wanted = wanted
        self.found: dict[int, bytes] = {}

    def _u16(self, offset: int) -> int:
        return int(struct.unpack_from(f"{self.endian}H", self.data, offset)[0])

    def _u32(self, offset: int) -> int:
        return int(struct.unpack_from(f"{self.endian}I", self.data, offset)[0])

    def _tag(self, offset: int) -> int:
        self._need(offset, 4, "a tag")
        return (self._u16(offset) << 16) | self._u16(offset + 2)

    def _need(self, offset: int, size: int, what: str) -> None:
        if offset + size > len(self.data):
            raise MalformedDataset(
                f"truncated at byte {offset}: {what} needs {size} bytes, "
                f"{len(self.data) - offset} remain"
            )

    def dataset(self, offset: int, end: int | None, depth: int) -> int:
        """Walk elements from ``offset`` to ``end`` (or to an item delimiter when None)."""
        if depth > MAX_DEPTH:
            raise MalformedDataset(f"sequences nested deeper than {MAX_DEPTH}")
        limit = len(self.data) if end is None else end
        while offset < limit:
            tag = self._tag(offset)
            if tag == ITEM_DELIMITER:
                if end is not None:
                    raise MalformedDataset(f"unexpected item delimiter at byte {offset}")
                self._need(offset, 8, "an item delimiter")
                return offset + 8
            offset = self.element(offset, tag, depth)
        if end is None and depth > 0:
            raise MalformedDataset("an item of undefined length has no delimiter")
        if offset != limit:
            raise MalformedDataset(f"an element runs past its container at byte {limit}")
        return offset

    def element(self, offset: int, tag: int, depth: int) -> int:
        if self.implicit or (tag >> 16) == 0xFFFE:
            self._need(offset, 8, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            vr = b"SQ" if (not self.implicit) else None
            length = self._u32(offset + 4)
            value_at = offset + 8
        else:
            self._need(offset, 8, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            vr = self.data[offset + 4 : offset + 6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise MalformedDataset(f"invalid VR {vr!r} at byte {offset + 4}")
            if vr in LONG_VRS:
                self._need(offset, 12, "a long-form element header")
                length = self._u32(offset + 8)
                value_at = offset + 12
            else:
                length = self._u16(offset + 6)
                value_at = offset + 8
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if length == UNDEFINED:
            if tag == 0x7FE00010 and vr not in (None, b"SQ", b"UN"):
                return self.fragments(value_at)
            if vr not in (None, b"SQ", b"UN"):
                raise MalformedDataset(f"{name} has an undefined length but VR {vr!r}")
            if vr == b"UN":
                # PS3.5 6.2.2: UN of undefined length holds an implicit VR sequence.
                inner = _Walker(self.data, implicit=True, little=True)
                return inner.sequence(value_at, None, depth + 1)
            return self.sequence(value_at, None, depth + 1)
        self._need(value_at, length, f"the value of {name} ({length} bytes)")
        if depth == 0 and tag in self.wanted:
            self.found[tag] = self.data[value_at : value_at + length]
        if vr == b"SQ" or (self.implicit and self._looks_like_sequence(value_at, length)):
            self.sequence(value_at, value_at + length, depth + 1)
        return value_at + length

    def _looks_like_sequence(self, offset: int, length: int) -> bool:
        # In implicit VR a defined-length SQ is recognisable only by its first item tag.
        return length >= 8 and self._tag(offset) == ITEM

    def sequence(self, offset: int, end: int | None, depth: int) -> int:
        limit = len(self.data) if end is None else end
        while offset < limit:
            tag = self._tag(offset)
            self._need(offset, 8, "an item header")
            length = self._u32(offset + 4)
            if tag == SEQUENCE_DELIMITER:
                if end is not None:
                    raise MalformedDataset(f"unexpected sequence delimiter at byte {offset}")
                return offset + 8
            if tag != ITEM:
                raise MalformedDataset(
                    f"expected an item at byte {offset}, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            if length == UNDEFINED:
                offset = self.dataset(offset + 8, None, depth)
            else:
                self._need(offset + 8, length, f"an item of {length} bytes")
                self.dataset(offset + 8, offset + 8 + length, depth)
                offset += 8 + length
        if end is None:
            raise MalformedDataset("a sequence of undefined length has no delimiter")
        if offset != limit:
            raise MalformedDataset("a sequence's items run past its length")
        return offset

    def fragments(self, offset: int) -> int:
        while True:
            tag = self._tag(offset)
            self._need(offset, 8, "a fragment header")
            length = self._u32(offset + 4)
            if tag == SEQUENCE_DELIMITER:
                return offset + 8
            if tag != ITEM or length == UNDEFINED:
                raise MalformedDataset(f"invalid encapsulated pixel data at byte {offset}")
            self._need(offset + 8, length, f"a pixel data fragment of {length} bytes")
            offset += 8 + length


def check_well_formed(
    data: bytes,
    *,
    implicit: bool,
    little: bool,
    wanted: frozenset[int] = frozenset(),
) -> dict[int, bytes]:
    """Raise :class:`MalformedDataset` unless ``data`` (inflated, where the syntax deflates)
    is a structurally complete dataset.

    Returns the raw values of the top-level elements whose tags are ``wanted`` and present."""
    if not data:
        raise MalformedDataset("the dataset is empty")
    walker = _Walker(data, implicit, little, wanted)
    try:
        walker.dataset(0, len(data), 0)
    except MalformedDataset as exc:
        # Some senders encode implicit VR under an explicit VR syntax; pydicom reads those,
        # so we accept them when they are well formed as implicit VR.
        if implicit or not little or not str(exc).startswith("invalid VR"):
            raise
        walker = _Walker(data, True, True, wanted)
        walker.dataset(0, len(data), 0)
    return walker.found
