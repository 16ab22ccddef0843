"""Prompt reactors: pynetdicom's threads of an accepted association wake when there is work.

Each association runs two polling loops in pynetdicom: the DUL thread reads the socket and
sends what is queued for the peer, and the association thread takes complete DIMSE messages
to their handlers. Each sleeps about a millisecond whenever it finds nothing to do, so a
C-STORE waits on average half a millisecond for its handler and half a millisecond again
before its response leaves (with 0.5 MB CT images from ``storescu``, about a seventh of the
time per instance), and an idle association keeps its two loops turning a thousand times a
second (four idle associations: a third of a core).

For the associations of our server, those sleeps become waits that end as soon as there is
work: the DUL thread's on its socket and on a wake-up pipe written when a primitive is
queued for the peer, the association thread's on an event set when a message or primitive
is queued for it. With nothing to wake them they last ``IDLE_WAIT_S``, so what is still
polled (timers of seconds, the end of a released association) is seen that much later. The
loops check everything they checked before, so where pynetdicom's loops change the fallback
is its own plain sleep.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

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
