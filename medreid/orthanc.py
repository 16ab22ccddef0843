"""A local Orthanc as the hospital's PACS, for `medreid demo`, the tests and the benchmarks:
started on free ports with its own storage, knowing medreid as a modality, forwarding to
medreid what arrives by C-STORE, reached through its REST API."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc")


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Local peers (the demo's PACS, a test's service) listen below the kernel's ephemeral range, so
# no outgoing connection can take a port between its pick and the peer's bind; drawn at random,
# so that processes picking at the same moment rarely meet, and never twice in one process.
_EPHEMERAL_START = _ephemeral_ports_start()
_PEER_PORTS = range(max(1024, _EPHEMERAL_START - 12_000), _EPHEMERAL_START)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now and this process has not handed out."""
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.choice(_PEER_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # the range is crowded: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS under /dicom-web
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

FORWARD_RULE = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  -- what arrives by C-STORE goes on to medreid; uploads are sent explicitly
  if origin['RequestOrigin'] == 'DicomProtocol' then
    SendToModality(instanceId, 'medreid')
  end
end
"""


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        medreid_port: int,
        dicom_port: int | None = None,
        *,
        http_port: int | None = None,
        modalities: dict[str, list[Any]] | None = None,
        dicomweb: bool = False,
    ) -> None:
        """``modalities``: more AEs the PACS knows (name -> [AE, host, port]), such as a
        C-MOVE destination; medreid itself is known as "medreid". ``dicomweb``: with the
        DICOMweb plugin, at ``dicomweb_url``."""
        self.workdir = workdir
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "forward.lua").write_text(FORWARD_RULE)
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {
                "medreid": ["MEDREID", "127.0.0.1", medreid_port],
                **(modalities or {}),
            },
            "LuaScripts": [str(workdir / "forward.lua")],
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            # close each forwarding association at once, so its audit is written at once
            "DicomAssociationCloseDelay": 0,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log = (workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [str(ORTHANC), str(workdir / "orthanc.json")], stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.2)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        return self.request("POST", path, body)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
