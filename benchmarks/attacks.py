"""What a hostile DICOM peer sends, built byte by byte: association PDUs (whole, cut short,
announcing more than they hold, or mutated), and a deflated dataset that inflates a
thousandfold. Used by ``benchmarks.hostile_peers`` and by the tests of the same attacks."""

from __future__ import annotations

import collections
import contextlib
import random
import select
import socket
import struct
import zlib
from pathlib import Path

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_CLASS = "1.2.826.0.1.3680043.9.7433.1.1"

# (PDU type, reserved, length): every PDU begins so (PS3.8 9.3.1)
PDU_HEADER = struct.Struct(">BBL")


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def associate_rq(
    called: str = "MEDREID",
    calling: str = "ATTACKER",
    contexts: tuple[tuple[str, tuple[str, ...]], ...] = (
        (VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),
    ),
    max_length: int = 16384,
) -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    body = struct.pack(">HH", 1, 0)
    body += called.ljust(16).encode("ascii") + calling.ljust(16).encode("ascii") + bytes(32)
    body += _item(0x10, _uid(APPLICATION_CONTEXT))
    for index, (abstract, syntaxes) in enumerate(contexts):
        context = struct.pack(">BBBB", 2 * index + 1, 0, 0, 0) + _item(0x30, _uid(abstract))
        context += b"".join(_item(0x40, _uid(s)) for s in syntaxes)
        body += _item(0x20, context)
    user = _item(0x51, struct.pack(">L", max_length)) + _item(0x52, _uid(IMPLEMENTATION_CLASS))
    body += _item(0x50, user)
    return PDU_HEADER.pack(0x01, 0, len(body)) + body


def stalled_request(announced: int = 175) -> bytes:
    """The first 7 bytes of an A-ASSOCIATE-RQ that announces ``announced`` bytes."""
    return PDU_HEADER.pack(0x01, 0, announced) + b"\x00"


def open_stalled(port: int, count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` connections that each send the start of a request and then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=5)
        with contextlib.suppress(OSError):  # refused at once: that is an answer too
            sock.sendall(stalled_request())
        sockets.append(sock)
    return sockets


def stream_endless_pdu(
    port: int,
    total_bytes: int,
    *,
    announced: int = 0xFFFFFFFF,
    chunk: int = 1 << 16,
    host: str = "127.0.0.1",
) -> int:
    """An A-ASSOCIATE-RQ header announcing ``announced`` bytes, then up to ``total_bytes`` of
    zeros. Returns how many bytes of the body the service took before it closed."""
    sent = 0
    block = bytes(chunk)
    with socket.create_connection((host, port), timeout=10) as sock:
        try:
            sock.sendall(PDU_HEADER.pack(0x01, 0, announced))
            while sent < total_bytes:
                sock.sendall(block)
                sent += chunk
        except OSError:
            pass
    return sent


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def _meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    elements = (
        struct.pack("<HH", 2, 1) + b"OB" + bytes(2) + struct.pack("<L", 2) + b"\x00\x01",
        _element(2, 2, b"UI", _uid(sop_class)),
        _element(2, 3, b"UI", _uid(sop_instance)),
        _element(2, 0x10, b"UI", _uid(syntax)),
        _element(2, 0x12, b"UI", _uid(IMPLEMENTATION_CLASS)),
    )
    group = b"".join(elements)
    length = _element(2, 0, b"UL", b"")[:6] + struct.pack("<H", 4) + struct.pack("<L", len(group))
    return bytes(128) + b"DICM" + length + group


def write_deflate_bomb(
    path: Path, *, inflated_bytes: int = 1 << 30, sop_instance: str = "1.2.826.0.1.99.1"
) -> Path:
    """A Secondary Capture file in Deflated Explicit VR Little Endian whose dataset inflates
    to about ``inflated_bytes`` (one private OB element of zeros), written as a stream."""
    header = b"".join(
        (
            _element(0x0008, 0x0016, b"UI", _uid(SECONDARY_CAPTURE)),
            _element(0x0008, 0x0018, b"UI", _uid(sop_instance)),
            _element(0x0008, 0x0060, b"CS", b"OT"),
            _element(0x0010, 0x0020, b"LO", b"BOMB"),
            _element(0x0020, 0x000D, b"UI", _uid(sop_instance + ".1")),
            _element(0x0020, 0x000E, b"UI", _uid(sop_instance + ".2")),
        )
    )
    payload = inflated_bytes - len(header) - 12
    payload -= payload % 2
    header += struct.pack("<HH", 0x0009, 0x1010) + b"OB" + bytes(2) + struct.pack("<L", payload)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with path.open("wb") as out:
        out.write(_meta(SECONDARY_CAPTURE, sop_instance, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN))
        out.write(deflater.compress(header))
        left = payload
        while left:
            step = min(left, len(zeros))
            out.write(deflater.compress(zeros[:step]))
            left -= step
        out.write(deflater.flush())
    return path


# ---------------------------------------------------------------------------- fuzzing


def mutate_request(rng: random.Random, request: bytes) -> bytes:
    """One seeded mutation of an A-ASSOCIATE-RQ: its lengths (PDU, items, user information
    sub-items) overwritten, bytes flipped, cut short, items repeated or inserted."""
    data = bytearray(request)
    choice = rng.randrange(7)
    if choice == 0:  # the PDU length
        struct.pack_into(">L", data, 2, rng.choice([0, 1, 68, len(data), 0xFFFF, 0xFFFFFFFF]))
    elif choice == 1:  # an item length somewhere in the variable part
        offsets = _item_offsets(bytes(data))
        if offsets:
            at = rng.choice(offsets)
            struct.pack_into(">H", data, at + 2, rng.choice([0, 1, 3, 0x7FFF, 0xFFFF]))
    elif choice == 2:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 3:  # cut short, with the length left as announced
        del data[rng.randrange(6, len(data)) :]
    elif choice == 4:  # an item repeated many times
        offsets = _item_offsets(bytes(data))
        if offsets:
            at = rng.choice(offsets)
            length = struct.unpack_from(">H", data, at + 2)[0]
            item = bytes(data[at : at + 4 + length])
            data[at:at] = item * rng.randint(2, 200)
            struct.pack_into(">L", data, 2, len(data) - 6)
    elif choice == 5:  # an unknown or empty user information sub-item
        extra = _item(rng.choice([0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0xFF]),
                      rng.randbytes(rng.choice([0, 1, 2, 4, 64, 300])))  # fmt: skip
        data += extra
        struct.pack_into(">L", data, 2, len(data) - 6)
    else:  # noise inserted after the fixed fields
        at = rng.randrange(74, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 64))
        if rng.random() < 0.5:
            struct.pack_into(">L", data, 2, len(data) - 6)
    return bytes(data)


def _item_offsets(request: bytes) -> list[int]:
    """Offsets of the items (and the user information's sub-items) after the fixed fields."""
    offsets, at = [], 74
    while at + 4 <= len(request):
        item_type, _, length = struct.unpack_from(">BBH", request, at)
        offsets.append(at)
        if item_type in (0x20, 0x50):  # items that hold items
            inner = at + 4 + (4 if item_type == 0x20 else 0)
            while inner + 4 <= min(at + 4 + length, len(request)):
                offsets.append(inner)
                inner += 4 + struct.unpack_from(">H", request, inner + 2)[0]
        at += 4 + length
    return offsets


def fuzz_requests(
    port: int, *, cases: int, seed: int, batch: int = 16, wait_s: float = 4.0
) -> collections.Counter[str]:
    """Send ``cases`` mutated A-ASSOCIATE-RQs, ``batch`` connections at a time, and tally what
    the service did first with each within ``wait_s``: the type of the PDU it answered with
    (``0x02`` accepted, ``0x03`` rejected, ``0x07`` aborted), ``closed``, or ``no answer``."""
    rng = random.Random(seed)
    valid = associate_rq(
        contexts=(
            (VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),
            (CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)),
        )
    )
    outcomes: collections.Counter[str] = collections.Counter()
    for start in range(0, cases, batch):
        sockets = []
        for _ in range(min(batch, cases - start)):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            with contextlib.suppress(OSError):
                sock.sendall(mutate_request(rng, valid))
            sockets.append(sock)
        for sock in sockets:
            outcomes[_first_answer(sock, wait_s)] += 1
            sock.close()
    return outcomes


def _first_answer(sock: socket.socket, timeout: float) -> str:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return "no answer"
    try:
        data = sock.recv(1)
    except OSError:
        return "closed"
    return f"0x{data[0]:02X}" if data else "closed"
