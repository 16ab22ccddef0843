"""The sockets the guard hands to pynetdicom: every byte read is accounted for, PDU by PDU.

A read is checked against the limits of ``scp.transport.GuardLimits`` where a PDU or PDV
header completes, so a peer that announces more than it may send is aborted before anything
is buffered (``scp.transport`` says what the guard does, and why).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scp.transport import ConnectionGuard

# An A-ASSOCIATE-RQ with 128 presentation contexts of 20 transfer syntaxes each is about
# 72 KiB; every other PDU but P-DATA-TF is a few bytes.
ASSOCIATE_RQ_MAX_BYTES = 256 * 1024
# A command set is a few hundred bytes; a larger one is no command a peer needs to send.
COMMAND_SET_MAX_BYTES = 64 * 1024
# A-ABORT from the service provider, reason 6: invalid PDU parameter value (PS3.8 9.3.8).
ABORT_PDU = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")
P_DATA_TF = 0x04


class PduRefused(ConnectionAbortedError):
    """A peer's PDU broke a limit; the connection is aborted (pynetdicom sees it closed)."""


class GuardedConnection:
    """Mixed into the socket classes the guard hands to pynetdicom."""

    _guard: ConnectionGuard | None = None
    _credit = 0
    _credited = 0

    def _guard_setup(self, guard: ConnectionGuard, host: str, port: int) -> None:
        self._guard = guard
        self.peer_host = host
        self.peer_port = port
        self.accepted_at = time.monotonic()
        self.requested = False  # the first PDU (the association request) has been read
        self.admitted = False  # pynetdicom has decoded the request and asks us about it
        self.ended = False  # closed, dropped or refused: no longer waiting for anything
        self.waiting = True  # counted among the connections that wait to associate
        self.pdu_started_at: float | None = None
        self._header = bytearray()
        self._pdu_type = 0
        self._remaining = 0  # bytes of the current PDU's body still to come
        self._pdv_header = bytearray()
        self._pdv_left = 0
        self._pdv_is_data = False
        self._pdv_last = False
        self._stream_bytes = [0, 0]  # the current message's command and dataset bytes so far
        self.association: weakref.ref[Any] | None = None
        self.released_waiter = False
        self.orphaned_rounds = 0  # watchdog rounds its association's thread was seen ended
        # Bytes that may still be read before anything is to be checked (the end of a PDU or
        # a PDV, a limit): a read smaller than that is only counted, and settled later.
        self._credit = 0
        self._credited = 0

    _raw_recv: Callable[..., bytes]
    _raw_recv_into: Callable[..., int]

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # a read inside a PDV's value (nearly every one) costs a comparison
        data = self._raw_recv(buflen, flags)
        if 0 < len(data) < self._credit:
            self._credit -= len(data)
            self._credited += len(data)
        else:
            self._read(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        # explicit: the TLS socket reads 1 KiB where the plain one reads the whole buffer
        count = self._raw_recv_into(buffer, nbytes or len(buffer), flags)
        if 0 < count < self._credit:
            self._credit -= count
            self._credited += count
        else:
            self._read(memoryview(buffer)[:count])
        return count

    def _read(self, data: bytes | memoryview) -> None:
        """A read that reaches a boundary or a limit, or the end of the connection."""
        guard = self._guard
        if guard is None:
            return
        self._settle()
        if data:
            self._account(data)
            self._credit = self._next_credit()
        else:
            guard.peer_closed(self)

    def _settle(self) -> None:
        """Apply the reads counted on credit."""
        count, self._credited, self._credit = self._credited, 0, 0
        if not count:
            return
        self._remaining -= count
        if self._pdu_type == P_DATA_TF:
            self._pdv_left -= count
            self._stream_bytes[int(self._pdv_is_data)] += count

    def _next_credit(self) -> int:
        if self._remaining == 0:
            return 0  # a PDU header is next
        if self._pdu_type != P_DATA_TF:
            return self._remaining
        if self._pdv_left == 0:
            return 0  # a PDV header is next
        room = self._stream_limit() - self._stream_bytes[int(self._pdv_is_data)]
        return min(self._remaining, self._pdv_left, room)

    def _stream_limit(self) -> int:
        """The most the current message's dataset (or command set) may hold."""
        assert self._guard is not None
        return self._guard.limits.max_dataset_bytes if self._pdv_is_data else COMMAND_SET_MAX_BYTES

    def close(self) -> None:
        guard = self._guard
        if guard is not None:
            guard.forget(self)
        super().close()  # type: ignore[misc]

    # ---------------------------------------------------------------- accounting

    def _account(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        at, size = 0, len(view)
        while at < size:
            if self._remaining == 0:
                if not self._header:
                    self.pdu_started_at = time.monotonic()
                at = _fill(self._header, view, at)
                if len(self._header) < 6:
                    return
                pdu_type, _, length = PDU_HEADER.unpack(self._header)
                self._header.clear()
                self._check_pdu(pdu_type, length)
                self._pdu_type, self._remaining = pdu_type, length
                if length == 0:
                    self._pdu_done()
                continue
            take = min(self._remaining, size - at)
            if self._pdu_type == P_DATA_TF:
                self._account_pdvs(view[at : at + take])
            self._remaining -= take
            at += take
            if self._remaining == 0:
                self._pdu_done()

    def _check_pdu(self, pdu_type: int, length: int) -> None:
        assert self._guard is not None
        limits = self._guard.limits
        if not self.requested or pdu_type != P_DATA_TF:
            if length > ASSOCIATE_RQ_MAX_BYTES:
                what = "an association request" if not self.requested else f"a PDU 0x{pdu_type:02X}"
                self._refuse(f"{what} announced {length} bytes, over {ASSOCIATE_RQ_MAX_BYTES}")
        else:
            largest = limits.max_pdu or limits.max_dataset_bytes + COMMAND_SET_MAX_BYTES
            if length > largest:
                self._refuse(f"a P-DATA-TF PDU announced {length} bytes, over {largest}")

    def _account_pdvs(self, chunk: memoryview) -> None:
        at, size = 0, len(chunk)
        while at < size:
            if self._pdv_left:
                take = min(self._pdv_left, size - at)
                self._pdv_left -= take
                at += take
                self._add_to_stream(take)
                continue
            at = _fill(self._pdv_header, chunk, at)
            if len(self._pdv_header) < 6:
                return
            length, _context, control = PDV_HEADER.unpack(self._pdv_header)
            self._pdv_header.clear()
            self._pdv_left = max(length - 2, 0)
            self._pdv_is_data = not control & 0x01
            self._pdv_last = bool(control & 0x02)
            self._add_to_stream(0)

    def _add_to_stream(self, count: int) -> None:
        index = int(self._pdv_is_data)
        self._stream_bytes[index] += count
        limit = self._stream_limit()
        if self._stream_bytes[index] > limit:
            what = "a dataset" if index else "a command set"
            self._refuse(f"{what} of more than {limit} bytes")
        if self._pdv_left == 0 and self._pdv_last:
            self._stream_bytes[index] = 0

    def _pdu_done(self) -> None:
        self.pdu_started_at = None
        if not self.requested:
            self.requested = True
            assert self._guard is not None
            self._guard.request_read(self)

    def _refuse(self, reason: str) -> None:
        assert self._guard is not None
        self._guard.drop(self, reason, abort=True)
        raise PduRefused(reason)


def _fill(header: bytearray, view: memoryview, at: int) -> int:
    """Add to a 6-byte PDU or PDV header what of it the read holds from ``at``; where the
    read goes on."""
    take = min(6 - len(header), len(view) - at)
    header += view[at : at + take]
    return at + take


class GuardedSocket(GuardedConnection, socket.socket):
    """A plain TCP connection under the guard."""

    _raw_recv = socket.socket.recv
    _raw_recv_into = socket.socket.recv_into


class GuardedSSLSocket(GuardedConnection, ssl.SSLSocket):
    """A DICOM TLS connection under the guard (set as the server context's socket class)."""

    _raw_recv = ssl.SSLSocket.recv
    _raw_recv_into = ssl.SSLSocket.recv_into
