"""The pynetdicom adapter: the wake-ups that replace pynetdicom's idle sleeps for our
associations, the version check, and pynetdicom's own paths where the version is not one
the hooks were tested with."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, association, dul
from pynetdicom.association import Association

from scp import pynetdicom_adapter as prompt
from scp.contexts import IMAGE_STORAGE_CLASSES
from scp.pynetdicom_adapter import (
    IDLE_WAIT_S,
    REACTOR_SLEEP_S,
    guard_requests,
    internals_usable,
    is_prompt,
    make_prompt,
)
from support.dicom_factory import CT_IMAGE_STORAGE
from tests.conftest import ServerFactory
from tests.test_scp import associate, ct, our_side


def unstarted_acceptor() -> Any:
    return Association(AE(), "acceptor")


def timed(wait: Any, seconds: float) -> float:
    started = time.monotonic()
    wait(seconds)
    return time.monotonic() - started


def test_install_leaves_other_threads_sleeping_as_before() -> None:
    prompt.install()
    assert isinstance(association.time, prompt._PromptTime)
    assert isinstance(dul.time, prompt._PromptTime)
    assert association.time.monotonic is time.monotonic  # the rest is the time module
    # no association of ours: a plain sleep, its full length
    assert timed(association.time.sleep, 0.001) >= 0.001
    assert timed(dul.time.sleep, 0.02) >= 0.02


def test_only_short_sleeps_of_a_prompt_thread_are_replaced() -> None:
    waited: list[float] = []

    def sleeps() -> None:
        for seconds in (REACTOR_SLEEP_S, 0.0001, 0.1):
            association.time.sleep(seconds)

    thread = threading.Thread(target=sleeps)
    prompt.install()
    prompt._waits[thread] = waited.append
    thread.start()
    thread.join()
    # the idle reactor's sleep becomes a longer wait that work ends early; the 0.1 s sleep
    # (as after an abort) is slept in full, never cut short
    assert waited == [IDLE_WAIT_S, 0.0001]


def test_the_association_thread_wakes_when_a_message_is_queued() -> None:
    assoc = unstarted_acceptor()
    make_prompt(assoc)
    assert is_prompt(assoc)
    wait = prompt._waits[assoc]
    assert timed(wait, 0.05) >= 0.045  # nothing queued: the whole wait
    assoc.dimse.msg_queue.put((1, "message"))
    assert timed(wait, 5.0) < 1.0
    assert assoc.dimse.get_msg() == (1, "message")
    # a primitive from the peer (a release request, say) wakes it too
    assoc.dul.to_user_queue.put("A-RELEASE")
    assert timed(wait, 5.0) < 1.0
    assert timed(wait, 0.05) >= 0.045  # woken once per put, not for ever


def test_the_dul_thread_wakes_when_a_primitive_is_queued_for_the_peer() -> None:
    assoc = unstarted_acceptor()
    make_prompt(assoc)
    wait = prompt._waits[assoc.dul]
    assert timed(wait, 0.05) >= 0.045
    for _ in range(3):
        assoc.dul.to_provider_queue.put("P-DATA")
    assert timed(wait, 5.0) < 1.0
    assert assoc.dul.to_provider_queue.qsize() == 3
    assert timed(wait, 0.05) >= 0.045  # the wake-ups were drained


def test_the_dul_thread_wakes_when_its_socket_has_data() -> None:
    assoc = unstarted_acceptor()
    ours, peer = socket.socketpair()
    try:
        assoc.dul.socket = SimpleNamespace(socket=ours)
        make_prompt(assoc)
        wait = prompt._waits[assoc.dul]
        assert timed(wait, 0.05) >= 0.045
        peer.sendall(b"\x04\x00")
        assert timed(wait, 5.0) < 1.0
    finally:
        ours.close()
        peer.close()


def test_an_association_already_at_work_is_left_as_it_is() -> None:
    assoc = unstarted_acceptor()
    assoc.dimse.msg_queue.put((1, "already queued"))
    make_prompt(assoc)
    assert not is_prompt(assoc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_wake_up_pipes_are_closed_with_their_associations() -> None:
    def open_fds() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(20):
        make_prompt(unstarted_acceptor())
    assert open_fds() <= before + 2


@pytest.fixture
def untested_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """pynetdicom claims a version the adapter was not tested with."""
    monkeypatch.setattr(pynetdicom, "__version__", "4.0.0")
    internals_usable.cache_clear()
    yield "4.0.0"
    internals_usable.cache_clear()


def serve_a_few(server: Any) -> Any:
    """C-ECHO and C-STOREs over one association; returns our side of it, still open."""
    assoc = associate(server)
    assert assoc.is_established
    for n in range(20):
        assert assoc.send_c_echo().Status == 0x0000
        assert int(assoc.send_c_store(ct(value=n)).Status) == 0x0000
    acceptor = our_side(server)
    assoc.release()
    return acceptor


def test_the_tested_pynetdicom_takes_the_fast_paths(make_server: ServerFactory) -> None:
    internals_usable.cache_clear()
    assert internals_usable()
    acceptor = serve_a_few(make_server())
    assert is_prompt(acceptor)
    assert "send_msg" in vars(acceptor.dimse)  # responses encoded directly
    assert "recv" in vars(acceptor.dul.socket)  # PDU bodies read in bulk


def test_an_untested_pynetdicom_serves_through_its_own_paths(
    untested_pynetdicom: str, make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="scp.pynetdicom_adapter"):
        assert not internals_usable()
    assert f"pynetdicom {untested_pynetdicom} is not one of the versions" in caplog.text
    acceptor = serve_a_few(make_server())
    assert not is_prompt(acceptor)
    assert "send_msg" not in vars(acceptor.dimse)
    assert "recv" not in vars(acceptor.dul.socket)


def test_an_untested_pynetdicom_still_refuses_an_unknown_peer(
    untested_pynetdicom: str, make_server: ServerFactory
) -> None:
    """Refused by an A-ABORT there (no A-ASSOCIATE-RJ with the reason), and served after."""
    server = make_server(allowed_peers=("STORESCU",))
    refused = associate(server, calling="ROGUE")
    assert not refused.is_established and refused.is_aborted
    assert serve_a_few(server) is not None


def test_a_silent_connection_still_ends_without_the_fast_paths(
    untested_pynetdicom: str, make_server: ServerFactory
) -> None:
    """The guard cannot wake the acceptor's wait for a request then: the association waits
    for the ACSE timeout, and ends."""
    server = make_server(acse_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        silent.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            silent.recv(1024)  # returns once the guard's deadline has closed it
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while server.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.ae.active_associations


def reactor_woken_then_paused_again(pause: threading.Event, assoc: Any) -> list[str]:
    """What pynetdicom's reactor does (say paused, wait, say running, take a message) when the
    previous request opens its pause and the next closes it again before the reactor runs."""
    took: list[str] = []

    def reactor() -> None:
        assoc._is_paused = True
        pause.wait()
        assoc._is_paused = False
        took.append("the next request's response")

    pause.clear()  # a request under way
    thread = threading.Thread(target=reactor, daemon=True)
    thread.start()
    while not assoc._is_paused:
        time.sleep(0.001)
    time.sleep(0.05)  # the reactor waits on the pause
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the reactor, woken, does not run before the next request
    try:
        pause.set()  # the previous request has its response
        pause.clear()  # the next begins, and sees the reactor paused
        seen_paused = assoc._is_paused
    finally:
        sys.setswitchinterval(interval)
    assert seen_paused
    time.sleep(0.3)
    if not took:
        assert assoc._is_paused  # paused still, as the next request was told
        pause.set()  # its response taken, the request opens the pause
        thread.join(timeout=5)
        assert took
        took.insert(0, "nothing while the request was under way")
    return took


class RequestedAssociation:
    """What the pause sees of an established association."""

    def __init__(self) -> None:
        self.is_established = True
        self._is_paused = False
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()


def test_pynetdicoms_own_pause_lets_the_reactor_take_a_requests_response() -> None:
    """The race :func:`guard_requests` closes, on pynetdicom's own pause."""
    assoc = RequestedAssociation()
    assert reactor_woken_then_paused_again(assoc._reactor_checkpoint, assoc) == [
        "the next request's response"
    ]


def test_a_guarded_pause_keeps_the_reactor_waiting_until_the_request_has_its_response() -> None:
    assoc = RequestedAssociation()
    assert guard_requests(assoc) is assoc
    pause = assoc._reactor_checkpoint
    assert isinstance(pause, prompt._RequestPause) and pause.is_set()
    assert reactor_woken_then_paused_again(pause, assoc) == [
        "nothing while the request was under way",
        "the next request's response",
    ]


def test_guarded_requests_are_answered(make_server: ServerFactory) -> None:
    server = make_server()
    assoc = associate(server)  # tests.test_scp.associate guards the associations it makes
    assert isinstance(assoc._reactor_checkpoint, prompt._RequestPause)
    assoc.release()
    assert serve_a_few(server) is not None  # 20 echoes and 20 stores, guarded


def test_an_untested_pynetdicom_leaves_requests_unguarded(
    untested_pynetdicom: str, make_server: ServerFactory
) -> None:
    assoc = associate(make_server())
    assert type(assoc._reactor_checkpoint) is threading.Event
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_image_storage_classes_come_from_pynetdicoms_public_contexts() -> None:
    public = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    assert set(IMAGE_STORAGE_CLASSES.values()) <= public
    assert IMAGE_STORAGE_CLASSES["CTImageStorage"] == CT_IMAGE_STORAGE
    assert "BasicTextSRStorage" not in IMAGE_STORAGE_CLASSES
    assert "SegmentationStorage" in IMAGE_STORAGE_CLASSES
