"""DICOM TLS for the SCP: a server context, and a handshake that is bounded and audited.

pynetdicom wraps each accepted socket with ``ssl_context.wrap_socket`` in its accept loop and
drops a failed handshake without a word. :class:`AuditedTLS` stands in for the context: it
finishes the handshake under a timeout (so a silent client cannot hold the accept loop) and
reports every failure, with the peer and the reason, before the connection is dropped.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSFailure:
    host: str
    port: int
    reason: str


def server_context(
    certificate: str,
    private_key: str,
    ca_certificates: str = "",
    *,
    require_client_certificate: bool = False,
) -> ssl.SSLContext:
    """TLS 1.2 or newer with the library's secure defaults (as BCP 195 asks)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if ca_certificates:
        context.load_verify_locations(ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        words = reason.upper().replace("_", " ")
        if "CERTIFICATE REQUIRED" in words or "PEER DID NOT RETURN" in words:
            return "no client certificate"
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


class AuditedTLS:
    """Duck-types the ``wrap_socket`` of an SSLContext for pynetdicom's AssociationServer."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        handshake_timeout_s: float,
        on_failure: Callable[[TLSFailure], None],
    ) -> None:
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s
        self.on_failure = on_failure

    def wrap_socket(self, sock: socket.socket, server_side: bool = True) -> ssl.SSLSocket:
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            host, port = "unknown", 0
        tls = self.context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
        tls.settimeout(self.handshake_timeout_s)
        try:
            tls.do_handshake()
        except (OSError, ValueError) as exc:
            failure = TLSFailure(str(host), int(port), failure_reason(exc))
            log.warning("TLS from %s:%d refused: %s", host, port, failure.reason)
            try:
                self.on_failure(failure)
            finally:
                tls.close()
            # the accept loop drops a connection on OSError, and only on OSError
            raise OSError(failure.reason) from exc
        tls.settimeout(None)
        return tls
