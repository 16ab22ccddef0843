"""The wake-ups that replace pynetdicom's idle sleeps for our associations."""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE, association, dul
from pynetdicom.association import Association

from scp import pynetdicom_adapter as prompt
from scp.pynetdicom_adapter import IDLE_WAIT_S, REACTOR_SLEEP_S, is_prompt, make_prompt


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
