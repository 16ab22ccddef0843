"""The guard in front of pynetdicom's transport: bounded time and bytes for every peer.

pynetdicom reads a PDU by asking its socket for the 6-byte header and then for as many bytes
as the header announces, blocking until they come: a peer that announces 175 bytes and sends
7 holds its association thread (and one of ``maximum_associations``) for as long as it keeps
the connection open, and one that announces 4 GiB is read into memory as fast as it sends.
It also counts a connection that has not yet sent its association request as an association.

The guard stands where pynetdicom's server hands each accepted socket to ``wrap_socket``
(the hook it has for TLS), and gives pynetdicom a socket of its own class that accounts for
every byte read:

- **Deadlines.** A connection must complete its A-ASSOCIATE-RQ within ``request_timeout_s``
  of being accepted, and any later PDU within ``pdu_timeout_s`` of its first byte. A watchdog
  shuts down a connection that misses either (pynetdicom then sees the connection closed),
  and reports it.
- **Lengths.** The first PDU, and every PDU but P-DATA-TF, may announce at most
  ``ASSOCIATE_RQ_MAX_BYTES``; a P-DATA-TF at most the maximum PDU length we announced; the
  fragments of one dataset at most ``max_dataset_bytes``. Past a limit the peer gets an
  A-ABORT at once and the read fails, before anything is buffered.
- **Connections waiting to associate** are limited in all and per host, at accept: a peer
  over the limit is closed at once, and the refusals are reported once a second per host.
  Associations are counted by the server only once their request has come (see
  :func:`admitted_associations`), so stalled connections never take an honest peer's slot.

A connection that ends before its request is complete lets its association thread go at once
(pynetdicom would otherwise keep it waiting for a request for the whole ACSE timeout), and one
whose association thread died in pynetdicom's negotiation (some malformed requests make it
raise) is closed and its reader stopped, where nothing else would ever close it.

What it needs of pynetdicom's association beyond its public API (the socket under it, the
acceptor's wait for its request, its reader's stop) it asks of ``scp.pynetdicom_adapter``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scp import pynetdicom_adapter

log = logging.getLogger(__name__)

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
WATCH_INTERVAL_S = 0.25


@dataclass(frozen=True)
class GuardLimits:
    request_timeout_s: float
    pdu_timeout_s: float
    max_pdu: int  # the maximum P-DATA-TF length we announce; 0: none announced
    max_dataset_bytes: int
    max_pending: int
    max_pending_per_host: int


@dataclass(frozen=True)
class GuardEvent:
    """A connection the guard refused at accept (``count`` of them) or dropped later."""

    host: str
    port: int
    reason: str
    refused_at_accept: bool = False
    count: int = 1


class PduRefused(ConnectionAbortedError):
    """A peer's PDU broke a limit; the connection is aborted (pynetdicom sees it closed)."""


class _Guarded:
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


class GuardedSocket(_Guarded, socket.socket):
    """A plain TCP connection under the guard."""

    _raw_recv = socket.socket.recv
    _raw_recv_into = socket.socket.recv_into


class GuardedSSLSocket(_Guarded, ssl.SSLSocket):
    """A DICOM TLS connection under the guard (set as the server context's socket class)."""

    _raw_recv = ssl.SSLSocket.recv
    _raw_recv_into = ssl.SSLSocket.recv_into


class ConnectionGuard:
    """Duck-types the ``wrap_socket`` of an SSLContext for pynetdicom's AssociationServer;
    wraps the TLS layer where there is one."""

    def __init__(
        self,
        limits: GuardLimits,
        *,
        on_event: Callable[[GuardEvent], None],
        tls: Any = None,
    ) -> None:
        self.limits = limits
        self.on_event = on_event
        self.tls = tls
        if tls is not None:
            tls.context.sslsocket_class = GuardedSSLSocket
        self._lock = threading.Lock()
        self._live: set[_Guarded] = set()
        self._pending_by_host: collections.Counter[str] = collections.Counter()
        self._pending = 0
        self._refused: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # ---------------------------------------------------------------- accept path

    def wrap_socket(self, sock: socket.socket, server_side: bool = True) -> socket.socket:
        try:
            host, port = (str(part) for part in sock.getpeername()[:2])
        except OSError:
            sock.close()
            raise
        reason = self._admit(host)
        if reason is not None:
            with contextlib.suppress(OSError):
                sock.close()
            raise ConnectionRefusedError(reason)  # the accept loop drops it: an OSError
        try:
            if self.tls is not None:
                wrapped: Any = self.tls.wrap_socket(sock, server_side=server_side)
            else:
                wrapped = GuardedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        except BaseException:
            self._release(host)
            raise
        wrapped._guard_setup(self, host, int(port))
        with self._lock:
            self._live.add(wrapped)
        self._start_watchdog()
        return wrapped

    def _admit(self, host: str) -> str | None:
        limits = self.limits
        with self._lock:
            if self._pending >= limits.max_pending:
                reason = f"{limits.max_pending} connections already wait to associate"
            elif self._pending_by_host[host] >= limits.max_pending_per_host:
                reason = (
                    f"{limits.max_pending_per_host} connections from this host wait to associate"
                )
            else:
                self._pending += 1
                self._pending_by_host[host] += 1
                return None
            self._refused[(host, reason)] += 1
        return reason

    def _release(self, host: str) -> None:
        with self._lock:
            self._pending -= 1
            self._pending_by_host[host] -= 1
            if self._pending_by_host[host] <= 0:
                del self._pending_by_host[host]

    # ---------------------------------------------------------------- from the sockets

    def _stop_waiting(self, sock: _Guarded) -> None:
        """The connection no longer waits to associate."""
        with self._lock:
            was_waiting = sock.waiting
            sock.waiting = False
        if was_waiting:
            self._release(sock.peer_host)

    def request_read(self, sock: _Guarded) -> None:
        self._stop_waiting(sock)

    def peer_closed(self, sock: _Guarded) -> None:
        if self._ended_before_request(sock):
            self._let_association_go(sock)

    def forget(self, sock: _Guarded) -> None:
        with self._lock:
            self._live.discard(sock)
        self._ended_before_request(sock)

    def _ended_before_request(self, sock: _Guarded) -> bool:
        """Closed: if its request never came, it waits no more; True in that case."""
        if sock.requested:
            return False
        self._stop_waiting(sock)
        sock.ended = True
        return True

    def drop(self, sock: _Guarded, reason: str, *, abort: bool = False) -> None:
        """End a connection that broke a limit: A-ABORT (for a PDU), shut it down, report it."""
        with self._lock:  # the watchdog and the connection's reader may both get here
            if sock.ended:
                return
            sock.ended = True
        log.warning("connection from %s:%d dropped: %s", sock.peer_host, sock.peer_port, reason)
        with contextlib.suppress(OSError, ValueError):
            if abort:
                sock.sendall(ABORT_PDU)  # type: ignore[attr-defined]
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        self._stop_waiting(sock)
        if not sock.admitted:
            self._let_association_go(sock)
        self._report(GuardEvent(sock.peer_host, sock.peer_port, reason))

    def admit(self, assoc: Any) -> None:
        """The association's request has come and been decoded (pynetdicom's EVT_REQUESTED):
        the request deadline no longer applies. A request that arrives whole but cannot be
        decoded leaves pynetdicom waiting for another; the deadline ends that too."""
        sock = _guarded(assoc)
        if sock is not None:
            sock.admitted = True

    def attach(self, assoc: Any) -> None:
        """Know the association of a connection (pynetdicom's EVT_CONN_OPEN, before its
        threads start), so that it can be let go if the connection ends before its request."""
        sock = _guarded(assoc)
        if sock is not None and sock._guard is self:
            sock.association = weakref.ref(assoc)
            if sock.ended and not sock.requested:
                self._let_association_go(sock)

    @staticmethod
    def _let_association_go(sock: _Guarded) -> None:
        assoc = sock.association() if sock.association is not None else None
        if assoc is None or sock.released_waiter:
            return
        sock.released_waiter = True
        pynetdicom_adapter.end_request_wait(assoc)

    def _report(self, event: GuardEvent) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.exception("could not report a refused connection")

    # ---------------------------------------------------------------- watchdog

    def _start_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is not None:
                return
            self._watchdog = threading.Thread(
                target=self._watch, name="medreid-connection-guard", daemon=True
            )
        self._watchdog.start()

    def _watch(self) -> None:
        limits = self.limits
        while not self._stop.wait(WATCH_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                live = list(self._live)
                refused, self._refused = self._refused, collections.Counter()
            for sock in live:
                if sock.ended:
                    continue
                started = sock.pdu_started_at
                if not sock.admitted and now - sock.accepted_at > limits.request_timeout_s:
                    self.drop(
                        sock,
                        f"association request not complete within {limits.request_timeout_s:g} s",
                    )
                elif started is not None and now - started > limits.pdu_timeout_s:
                    self.drop(sock, f"a PDU not complete within {limits.pdu_timeout_s:g} s")
                elif self._orphaned(sock):
                    self._end_orphan(sock)
            for (host, reason), count in refused.items():
                self._report(GuardEvent(host, 0, reason, refused_at_accept=True, count=count))

    @staticmethod
    def _orphaned(sock: _Guarded) -> bool:
        """Whether the connection's association thread ended and left it open for a whole
        watchdog round: pynetdicom's negotiation raised (on some malformed requests), and
        nothing would ever close it."""
        assoc = sock.association() if sock.admitted and sock.association is not None else None
        if assoc is None or assoc.is_alive():
            sock.orphaned_rounds = 0
            return False
        sock.orphaned_rounds += 1
        return sock.orphaned_rounds > 1

    def _end_orphan(self, sock: _Guarded) -> None:
        assoc = sock.association() if sock.association is not None else None
        self.drop(sock, "its association failed while negotiating", abort=True)
        if assoc is not None:
            pynetdicom_adapter.stop_reader(assoc)

    def stop(self) -> None:
        self._stop.set()

    def waiting(self) -> int:
        """Connections that wait to complete their association request."""
        with self._lock:
            return self._pending


def _guarded(assoc: Any) -> _Guarded | None:
    sock = pynetdicom_adapter.association_socket(assoc)
    return sock if isinstance(sock, _Guarded) else None


def admitted_associations(ae: Any) -> int:
    """Live acceptor associations whose request has come (the one being decided included):
    what ``scp.max_associations`` limits, instead of pynetdicom's count of every connection."""
    return sum(
        1
        for assoc in ae.active_associations
        if assoc.is_acceptor and assoc.requestor.primitive is not None
    )
