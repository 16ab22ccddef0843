"""The guard in front of pynetdicom's transport: bounded time and bytes for every peer.

pynetdicom reads a PDU by asking its socket for the 6-byte header and then for as many bytes
as the header announces, blocking until they come: a peer that announces 175 bytes and sends
7 holds its association thread (and one of ``maximum_associations``) for as long as it keeps
the connection open, and one that announces 4 GiB is read into memory as fast as it sends.
It also counts a connection that has not yet sent its association request as an association.

The guard stands where pynetdicom's server hands each accepted socket to ``wrap_socket``
(the hook it has for TLS), and gives pynetdicom a socket of its own class that accounts for
every byte read (``scp.guarded_socket``):

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
  ``scp.admission.admitted_associations``), so stalled connections never take an honest
  peer's slot.

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
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scp import pynetdicom_adapter
from scp.guarded_socket import (
    ABORT_PDU,
    GuardedConnection,
    GuardedSocket,
    GuardedSSLSocket,
)

log = logging.getLogger(__name__)

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
        self._live: set[GuardedConnection] = set()
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

    def _stop_waiting(self, sock: GuardedConnection) -> None:
        """The connection no longer waits to associate."""
        with self._lock:
            was_waiting = sock.waiting
            sock.waiting = False
        if was_waiting:
            self._release(sock.peer_host)

    def request_read(self, sock: GuardedConnection) -> None:
        self._stop_waiting(sock)

    def peer_closed(self, sock: GuardedConnection) -> None:
        if self._ended_before_request(sock):
            self._let_association_go(sock)

    def forget(self, sock: GuardedConnection) -> None:
        with self._lock:
            self._live.discard(sock)
        self._ended_before_request(sock)

    def _ended_before_request(self, sock: GuardedConnection) -> bool:
        """Closed: if its request never came, it waits no more; True in that case."""
        if sock.requested:
            return False
        self._stop_waiting(sock)
        sock.ended = True
        return True

    def drop(self, sock: GuardedConnection, reason: str, *, abort: bool = False) -> None:
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
    def _let_association_go(sock: GuardedConnection) -> None:
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
    def _orphaned(sock: GuardedConnection) -> bool:
        """Whether the connection's association thread ended and left it open for a whole
        watchdog round: pynetdicom's negotiation raised (on some malformed requests), and
        nothing would ever close it."""
        assoc = sock.association() if sock.admitted and sock.association is not None else None
        if assoc is None or assoc.is_alive():
            sock.orphaned_rounds = 0
            return False
        sock.orphaned_rounds += 1
        return sock.orphaned_rounds > 1

    def _end_orphan(self, sock: GuardedConnection) -> None:
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


def _guarded(assoc: Any) -> GuardedConnection | None:
    sock = pynetdicom_adapter.association_socket(assoc)
    return sock if isinstance(sock, GuardedConnection) else None
