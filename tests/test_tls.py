"""DICOM TLS: pynetdicom and DCMTK storescu with a trusted client certificate store; a client
without one, with an untrusted one, or without TLS at all is refused and audited."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select

from scp.contexts import VERIFICATION_CLASS
from scp.pynetdicom_adapter import guard_requests
from scp.server import DicomServer
from storage.models import AuditEvent, Instance
from support.dicom_factory import CT_IMAGE_STORAGE, encode
from tests.conftest import Database, ServerFactory
from tests.test_scp import ct
from tests.tls_certs import Pki, make_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_server(make_server: ServerFactory, pki: Pki, **extra: Any) -> DicomServer:
    return make_server(
        tls_certificate=str(pki.server_cert),
        tls_private_key=str(pki.server_key),
        tls_ca_certificates=str(pki.ca),
        tls_require_client_certificate=True,
        tls_handshake_timeout_s=2.0,
        **extra,
    )


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def store_over_tls(server: DicomServer, context: ssl.SSLContext) -> Any:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = 5
    ae.network_timeout = 5
    ae.add_requested_context(VERIFICATION_CLASS)
    ae.add_requested_context(CT_IMAGE_STORAGE)
    return guard_requests(
        ae.associate("127.0.0.1", server.port, ae_title="MEDREID", tls_args=(context, "127.0.0.1"))
    )


def tls_alerts(db: Database, expected: int = 1) -> list[AuditEvent]:
    """The TLS alerts, once ``expected`` are there (the server writes them in its accept
    thread, which can finish after the client has seen the connection drop)."""
    deadline = time.monotonic() + 5
    while True:
        with db.sessions.begin() as session:
            rows = list(
                session.scalars(
                    select(AuditEvent).where(AuditEvent.event_type == "Node Authentication")
                )
            )
            session.expunge_all()
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_trusted_client_stores_over_tls(
    make_server: ServerFactory, pki: Pki, sqlite_database: Database
) -> None:
    server = tls_server(make_server, pki)
    assoc = store_over_tls(server, client_context(pki, pki.client_cert, pki.client_key))
    assert assoc.is_established
    status = assoc.send_c_store(ct())
    assoc.release()
    assert int(status.Status) == 0x0000
    with sqlite_database.sessions.begin() as session:
        assert len(session.scalars(select(Instance)).all()) == 1
    assert tls_alerts(sqlite_database, expected=0) == []


@pytest.mark.parametrize("who", ["no certificate", "untrusted certificate", "plain TCP"])
def test_a_client_without_a_valid_certificate_is_refused_and_audited(
    make_server: ServerFactory, pki: Pki, sqlite_database: Database, who: str
) -> None:
    server = tls_server(make_server, pki)
    if who == "plain TCP":
        ae = AE(ae_title="PACS")
        ae.acse_timeout = ae.network_timeout = 3
        ae.add_requested_context(VERIFICATION_CLASS)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="MEDREID")
    else:
        cert, key = (None, None) if who == "no certificate" else (pki.rogue_cert, pki.rogue_key)
        assoc = store_over_tls(server, client_context(pki, cert, key))
        if assoc.is_established:  # TLS 1.3 reports a refused client certificate after the fact
            assoc.send_c_echo()
    assert not (assoc.is_established and assoc.is_alive())
    (alert,) = tls_alerts(sqlite_database)
    assert alert.event == "Security Alert" and alert.actor_host == "127.0.0.1"
    expected = {
        "no certificate": "no client certificate",
        "untrusted certificate": "client certificate not accepted",
        "plain TCP": "TLS handshake",
    }[who]
    assert expected in alert.detail["reason"]
    # and the server keeps serving trusted clients
    good = store_over_tls(server, client_context(pki, pki.client_cert, pki.client_key))
    assert good.is_established
    good.release()


def test_a_silent_client_does_not_hold_the_accept_loop(
    make_server: ServerFactory, pki: Pki, sqlite_database: Database
) -> None:
    server = tls_server(make_server, pki)
    with socket.create_connection(("127.0.0.1", server.port)):
        # says nothing: the handshake times out after 2 s; meanwhile a client waits its turn
        good = store_over_tls(server, client_context(pki, pki.client_cert, pki.client_key))
        assert good.is_established
        good.release()
    (alert,) = tls_alerts(sqlite_database)
    assert alert.detail["reason"] == "TLS handshake timed out"


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed")
def test_dcmtk_storescu_over_tls(
    make_server: ServerFactory, pki: Pki, sqlite_database: Database, tmp_path: Path
) -> None:
    server = tls_server(make_server, pki)
    path = tmp_path / "ct.dcm"
    path.write_bytes(encode(ct()))

    def storescu(*tls: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "storescu",
                *tls,
                "-aet",
                "PACS",
                "-aec",
                "MEDREID",
                "127.0.0.1",
                str(server.port),
                str(path),
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    sent = storescu("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert sent.returncode == 0, sent.stderr
    with sqlite_database.sessions.begin() as session:
        assert len(session.scalars(select(Instance)).all()) == 1
    rogue = storescu("+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca))
    assert rogue.returncode != 0
    assert any("not accepted" in a.detail["reason"] for a in tls_alerts(sqlite_database))
