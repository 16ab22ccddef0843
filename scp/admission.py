"""Who may associate: the allowed calling AE titles (optionally pinned to hosts), the
association limit, and the A-ASSOCIATE-RJ reasons."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic) triples, PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_DIAGNOSTICS = {
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x03, 0x02): "local limit exceeded: too many associations",
    (0x03, 0x01): "temporary congestion",
    (0x02, 0x02): "protocol version not supported",
}


@dataclass(frozen=True)
class AllowedPeer:
    ae_title: str
    hosts: frozenset[str] | None  # None: any host


def parse_allowed_peers(entries: tuple[str, ...]) -> list[AllowedPeer]:
    """'AE' or 'AE@host' entries; host names are resolved once, at start."""
    peers: list[AllowedPeer] = []
    for entry in entries:
        ae, _, host = entry.partition("@")
        hosts: frozenset[str] | None = None
        if host:
            try:
                addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
            except OSError:
                log.warning("allowed peer %s: host %s does not resolve", entry, host)
                addresses = set()
            hosts = frozenset(addresses | {host})
        peers.append(AllowedPeer(ae.strip(), hosts))
    return peers


def peer_allowed(peers: list[AllowedPeer], calling_ae: str, host: str) -> bool:
    if not peers:
        return True
    return any(p.ae_title == calling_ae and (p.hosts is None or host in p.hosts) for p in peers)


def admitted_associations(ae: Any) -> int:
    """Live acceptor associations whose request has come (the one being decided included):
    what ``scp.max_associations`` limits, instead of pynetdicom's count of every connection."""
    return sum(
        1
        for assoc in ae.active_associations
        if assoc.is_acceptor and assoc.requestor.primitive is not None
    )
