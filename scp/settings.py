"""The receiver's settings (the [scp] section): its own type, validated where it is used.

`medreid.settings` reads them from the file and the environment with the other sections;
an invalid value raises ValueError naming its key (``scp.port: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def check_range(key: str, value: float, low: float, high: float) -> None:
    """Raise ValueError naming ``key`` when ``value`` is outside ``low..high``."""
    if not low <= value <= high:
        raise ValueError(f"{key}: {value!r} is outside {low}..{high}")


@dataclass(frozen=True)
class ScpSettings:
    ae_title: str = "MEDREID"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    allowed_peers: tuple[str, ...] = ()
    require_called_ae: bool = True
    max_associations: int = 16
    # connections that have not yet completed their association request, in all and per host
    max_pending_connections: int = 64
    max_pending_per_host: int = 32
    max_pdu: int = 131072
    # the largest dataset received or inflated (Deflated syntax), and decoded pixel data
    max_dataset_mb: int = 512
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    # DICOM TLS (PS3.15 B.9): on when a certificate is given.
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_certificates: str = ""  # CAs whose client certificates are trusted
    tls_require_client_certificate: bool = False
    tls_handshake_timeout_s: float = 10.0

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_certificate)

    def validate(self) -> None:
        title = self.ae_title.strip()
        if not 1 <= len(title) <= 16 or "\\" in title or not title.isprintable():
            raise ValueError(
                f"scp.ae_title: {self.ae_title!r} is not a valid AE title (1-16 characters)"
            )
        check_range("scp.port", self.port, 1, 65535)
        check_range("scp.max_associations", self.max_associations, 1, 1000)
        check_range("scp.max_pending_connections", self.max_pending_connections, 1, 10000)
        check_range("scp.max_pending_per_host", self.max_pending_per_host, 1, 10000)
        check_range("scp.max_dataset_mb", self.max_dataset_mb, 1, 64 * 1024)
        if self.max_pdu != 0:
            check_range("scp.max_pdu", self.max_pdu, 4096, 2**32 - 1)
        for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            check_range(f"scp.{key}", getattr(self, key), 0.1, 86400.0)
        for peer in self.allowed_peers:
            ae, _, host = peer.partition("@")
            if not 1 <= len(ae.strip()) <= 16 or (("@" in peer) and not host):
                raise ValueError(f"scp.allowed_peers: {peer!r} is not 'AE' or 'AE@host'")
        check_range("scp.tls_handshake_timeout_s", self.tls_handshake_timeout_s, 0.1, 300.0)
        if self.tls_enabled and not self.tls_private_key:
            raise ValueError("scp.tls_private_key: required with scp.tls_certificate")
        if self.tls_require_client_certificate and not self.tls_ca_certificates:
            raise ValueError(
                "scp.tls_ca_certificates: required with scp.tls_require_client_certificate"
            )
        for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ValueError(f"scp.{key}: {path} is not a readable file")
