"""The ports local peers get: free, below the kernel's ephemeral range (which outgoing
connections draw from), and never the same twice in one process."""

from __future__ import annotations

import socket
from pathlib import Path

from medreid.orthanc import free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < first_ephemeral for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_another_socket_holds_is_not_handed_out() -> None:
    import random

    from medreid import orthanc

    held: list[socket.socket] = []
    try:
        for port in random.Random(0).sample(orthanc._PEER_PORTS, 600):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sock.listen()
            held.append(sock)
        taken = {s.getsockname()[1] for s in held}
        assert not taken & {free_port() for _ in range(300)}  # about 15 draws meet a held one
    finally:
        for sock in held:
            sock.close()
