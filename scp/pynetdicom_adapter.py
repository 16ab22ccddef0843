"""Every use of pynetdicom's internals, in one place.

pynetdicom's public API (the AE, its events and their primitives, presentation contexts) carries
the service. What it does not offer is reached here, through its internals:

- prompt reactors: an association's threads wake when there is work instead of polling;
- plain C-STORE responses encoded directly as bytes;
- a PDU's body read in as few reads as the network allows;
- for the guard in front of the transport: the socket under an association, the acceptor's
  wait for its request, and its reader's stop;
- an association request rejected from our own handler, with its reason;
- how much pynetdicom's standard handlers log;
- for the associations we request (PACS queries and retrievals, alert reports): a reactor
  that cannot take the response its own requester is waiting for.

These were tested with the pynetdicom versions in ``TESTED_VERSIONS``. With any other,
:func:`internals_usable` says no (and logs once which version it found) and every hook here
leaves pynetdicom's own path in place: its threads poll, its responses are encoded through
pydicom, its reads take 4 KiB at a time, a connection that never sends its association
request waits for the ACSE timeout before its association ends, and a peer refused by our
rules gets an A-ABORT instead of an A-ASSOCIATE-RJ with the reason. Slower, and refusals
less precise; nothing else changes.

Prompt reactors. Each association runs two polling loops in pynetdicom: the DUL thread reads
the socket and sends what is queued for the peer, and the association thread takes complete
DIMSE messages to their handlers. Each sleeps about a millisecond whenever it finds nothing to
do, so a C-STORE waits on average half a millisecond for its handler and half a millisecond
again before its response leaves (with 0.5 MB CT images from ``storescu``, about a seventh of
the time per instance), and an idle association keeps its two loops turning a thousand times a
second (four idle associations: a third of a core).

For the associations of our server, those sleeps become waits that end as soon as there is
work: the DUL thread's on its socket and on a wake-up pipe written when a primitive is queued
for the peer, the association thread's on an event set when a message or primitive is queued
for it. With nothing to wake them they last ``IDLE_WAIT_S``, so what is still polled (timers of
seconds, the end of a released association) is seen that much later. The loops check everything
they checked before, so where pynetdicom's loops change the fallback is its own plain sleep.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import select
import struct
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from scp.filemeta import padded

# major.minor of the pynetdicom releases whose internals these hooks were tested with
TESTED_VERSIONS = ("3.0",)
log = logging.getLogger(__name__)


@functools.cache
def internals_usable() -> bool:
    """Whether the installed pynetdicom is one these hooks were tested with."""
    installed = str(getattr(pynetdicom, "__version__", "unknown"))
    if ".".join(installed.split(".")[:2]) in TESTED_VERSIONS:
        return True
    log.warning(
        "pynetdicom %s is not one of the versions the receiver's fast paths were tested with "
        "(%s): using pynetdicom's own, slower paths",
        installed,
        ", ".join(f"{v}.x" for v in TESTED_VERSIONS),
    )
    return False


def log_handler_level(narrated: bool) -> None:
    """pynetdicom's standard handlers narrate every PDU and message at INFO and DEBUG, and copy
    each received dataset to see whether it is empty: bound only where it is logged."""
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "standard" if narrated else "none"


def prepare_association(assoc: Any) -> None:
    """Our hooks on an accepted association, before its threads start (EVT_CONN_OPEN); each
    that cannot be set up leaves pynetdicom's way in place."""
    if not internals_usable():
        return
    read_in_bulk(assoc)
    try:
        make_prompt(assoc)
    except Exception:
        log.warning("association left to poll: could not set up its wake-ups", exc_info=True)
    try:
        respond_directly(assoc)
    except Exception:
        log.warning("responses left to pynetdicom's encoder: could not set up", exc_info=True)


def reject(assoc: Any, rejection: tuple[int, int, int]) -> None:
    """Answer an association request with A-ASSOCIATE-RJ (result, source, diagnostic) from
    the EVT_REQUESTED handler, where pynetdicom offers no public way to; elsewhere abort it,
    which refuses it too, without the reason."""
    if not internals_usable():
        assoc.abort()
        return
    assoc.acse.send_reject(*rejection)
    assoc.is_rejected = True
    assoc.kill()


# --------------------------------------------------------------------------- the guard's hooks


def association_socket(assoc: Any) -> Any:
    """The socket under an association's DUL (None before it has one)."""
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def end_request_wait(assoc: Any) -> None:
    """Let an acceptor stop waiting for a request that will never come. pynetdicom's acceptor
    waits for it on this queue; None is what it gets when that wait times out, after which it
    ends the association itself. Elsewhere it waits for the ACSE timeout."""
    if internals_usable():
        assoc.dul.to_user_queue.put(None)


def stop_reader(assoc: Any) -> None:
    """Stop an association's reader thread, which nobody else would stop once its
    negotiation has raised."""
    if internals_usable():
        assoc.dul.kill_dul()


def read_in_bulk(assoc: Any) -> None:
    """Let the association's reader take each PDU in as few reads as the network allows.

    pynetdicom reads a PDU's body 4 KiB at a time into a growing buffer: 32 reads, and as
    many copies, for each 128 KiB PDU. Here the body is read into a buffer of its announced
    length (which the guard has checked by then), as much at a time as has arrived. Anything
    unexpected leaves pynetdicom's own reads in place."""
    transport = getattr(assoc.dul, "socket", None)
    if transport is None or not hasattr(transport, "recv") or transport.socket is None:
        return

    def recv(nr_bytes: int) -> bytearray:
        sock = transport.socket
        buffer = bytearray(nr_bytes)
        with memoryview(buffer) as view:
            got = 0
            while got < nr_bytes:
                count = sock.recv_into(view[got:])
                if not count:  # closed: what came, as pynetdicom's own read returns it
                    break
                got += count
        if got < nr_bytes:
            del buffer[got:]
        return buffer

    transport.recv = recv


# --------------------------------------------------------------------------- prompt reactors

# pynetdicom's reactors sleep this long when idle; shorter sleeps of the same threads (waits
# for a flag another thread sets) are woken too, longer ones (after an abort) never.
REACTOR_SLEEP_S = 0.001
# How long an idle reactor of ours waits instead, when nothing wakes it: what is left to
# polling (its timers, of seconds; an association being torn down) is checked this often,
# and an idle association costs a twentieth of the loops.
IDLE_WAIT_S = 0.02

_waits: weakref.WeakKeyDictionary[threading.Thread, Callable[[float], None]] = (
    weakref.WeakKeyDictionary()
)


class _PromptTime:
    """Stands in for the ``time`` module inside pynetdicom's association and DUL modules."""

    def __init__(self, module: ModuleType) -> None:
        self._time = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)

    def sleep(self, seconds: float) -> None:
        if seconds <= REACTOR_SLEEP_S:
            wait = _waits.get(threading.current_thread())
            if wait is not None:
                wait(IDLE_WAIT_S if seconds == REACTOR_SLEEP_S else seconds)
                return
        self._time.sleep(seconds)


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after each put."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


_install_lock = threading.Lock()


def install() -> None:
    """Let the pynetdicom modules' sleeps be woken (idempotent). Associations not passed to
    :func:`make_prompt` sleep exactly as before."""
    from pynetdicom import association, dul

    with _install_lock:
        for module in (association, dul):
            namespace = vars(module)
            if not isinstance(namespace["time"], _PromptTime):
                namespace["time"] = _PromptTime(time)


def make_prompt(assoc: Any) -> None:
    """Wake this accepted association's threads on work. Call before its threads start
    (pynetdicom's EVT_CONN_OPEN); anything unexpected leaves it as pynetdicom made it."""
    install()
    dul = assoc.dul
    queues = (dul.to_provider_queue, dul.to_user_queue, assoc.dimse.msg_queue)
    if dul.is_alive() or assoc.is_alive() or not all(q.empty() for q in queues):
        return  # already at work: replacing its queues could lose what they hold
    reactor_woken = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    # the pipe lives as long as the association, whichever thread is last to let it go
    weakref.finalize(assoc, _close_all, read_end, write_end)

    def wake_dul() -> None:
        # full: the DUL is woken already; closed: it has ended
        with contextlib.suppress(OSError):
            os.write(write_end, b"\0")

    # weakly: the waits are values of a dictionary weakly keyed by the threads
    dul_ref = weakref.ref(dul)

    def dul_wait(seconds: float) -> None:
        sockets: list[Any] = [read_end]
        transport = getattr(getattr(dul_ref(), "socket", None), "socket", None)
        if transport is not None and transport.fileno() >= 0:
            sockets.append(transport)
        try:
            ready, _, _ = select.select(sockets, [], [], seconds)
        except (OSError, ValueError):
            time.sleep(seconds)  # the socket closed meanwhile: as pynetdicom would
            return
        if read_end in ready:
            _drain(read_end)

    def reactor_wait(seconds: float) -> None:
        reactor_woken.wait(seconds)
        reactor_woken.clear()

    dul.to_provider_queue = _NotifyingQueue(wake_dul)
    dul.to_user_queue = _NotifyingQueue(reactor_woken.set)
    assoc.dimse.msg_queue = _NotifyingQueue(reactor_woken.set)
    _waits[dul] = dul_wait
    _waits[assoc] = reactor_wait


def is_prompt(assoc: Any) -> bool:
    """Whether :func:`make_prompt` set this association's threads to wake on work."""
    return assoc in _waits and assoc.dul in _waits


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):  # BlockingIOError once it is empty
        while os.read(fd, 4096):
            pass


def _close_all(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------- our own requests


class _RequestPause(threading.Event):
    """An association's reactor pause (pynetdicom's ``_reactor_checkpoint``) that re-checks
    itself on waking.

    To send a request, pynetdicom's ``send_*`` clears the pause, waits until the reactor says
    it is paused, sends, and takes the response off the message queue. The reactor says so
    before it waits on the pause and says it no longer is after the wait returns. A reactor
    that woke from its wait on the previous request's pause but has not yet said so looks
    paused to the next request, and goes on to take that request's response off the queue
    and drop it as unexpected: the requester waits out its DIMSE timeout (one C-ECHO in a
    few hundred with a busy thread beside them: ``benchmarks.request_race``). This pause says
    the reactor runs before it returns, then waits again if a request cleared it meanwhile."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self.set()
        self._assoc = weakref.ref(assoc)

    def wait(self, timeout: float | None = None) -> bool:
        while super().wait(timeout):
            assoc = self._assoc()
            if assoc is None:
                return True
            assoc._is_paused = False
            if self.is_set():
                return True
            # a request began before the reactor said it runs: it may have seen it paused
            assoc._is_paused = True
        return False


def guard_requests(assoc: Any) -> Any:
    """Close pynetdicom's race between a requested association's reactor and its requests
    (:class:`_RequestPause`). Call as soon as ``AE.associate`` returns, before the first
    request; returns the association. With other pynetdicom versions, or an association that
    is not established, it is left as it is."""
    if not internals_usable() or not getattr(assoc, "is_established", False):
        return assoc
    current = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(current, threading.Event) and current.is_set() and hasattr(assoc, "_is_paused"):
        # no request is under way (the pause is open), so the reactor never waits on it now
        assoc._reactor_checkpoint = _RequestPause(assoc)
    return assoc


# --------------------------------------------------------------------------- direct responses
# pynetdicom sends every response by building a DIMSE message from the primitive: a pydicom
# dataset of the command set, its values validated and set one by one, encoded twice (once to
# learn the group length). For a plain C-STORE response (a status, no error comment or
# offending element) that was a fifth of the time our server held the GIL while receiving CT
# images. For our associations such a response is built directly from its seven elements; the
# bytes are those pynetdicom would send (the tests compare them), and any other message, or
# any association where something listens for sent messages, goes pynetdicom's way.

_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
# Message Control Header of a command's last (here: only) fragment, PS3.8 E.2
_LAST_COMMAND_FRAGMENT = b"\x03"


def _element(element: int, value: bytes) -> bytes:
    """An element of group 0000 (Implicit VR Little Endian, as every command set)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def c_store_rsp_command(
    *, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The encoded command set of a C-STORE response with no optional elements."""
    body = b"".join(
        (
            _element(0x0002, padded(sop_class_uid, b"\x00")),
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATASET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, padded(sop_instance_uid, b"\x00")),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _plain_c_store_rsp(primitive: Any) -> bool:
    return (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
    )


def respond_directly(assoc: Any) -> None:
    """Send this association's plain C-STORE responses as directly encoded bytes. Call
    before its threads start (pynetdicom's EVT_CONN_OPEN)."""
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _plain_c_store_rsp(primitive) or assoc.get_handlers(evt.EVT_DIMSE_SENT):
            send(primitive, context_id)
            return
        command = c_store_rsp_command(
            message_id=primitive.MessageIDBeingRespondedTo,
            sop_class_uid=primitive.AffectedSOPClassUID,
            sop_instance_uid=primitive.AffectedSOPInstanceUID,
            status=primitive.Status,
        )
        maximum = dimse.maximum_pdu_size
        if maximum and len(command) > maximum - 6:
            send(primitive, context_id)  # would need fragments (a peer's PDU under 100 bytes)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        assoc.dul.send_pdu(pdata)

    dimse.send_msg = send_msg
