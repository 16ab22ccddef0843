"""Running `medreid serve` as a real process for tests, and DICOM senders to feed it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from medreid.orthanc import free_port
from pipeline.modelstore import generated_image_models
from scp.pynetdicom_adapter import guard_requests
from storage.models import Job, JobState

DCMTK_PROPOSALS = {
    "1.2.840.10008.1.2": ["-xi"],
    "1.2.840.10008.1.2.1": ["-xe"],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
}


@dataclass
class RunningService:
    workdir: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    module: str = "medreid.cli"  # tests.crashpoint: the same, killed at a chosen point

    def start(self, timeout: float = 90.0) -> None:
        self.log_path = self.workdir / f"serve-{int(time.time() * 1000)}.log"
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve"],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the test can kill it whole
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"medreid serve exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"medreid serve did not listen within {timeout} s:\n{self.log()}")

    @classmethod
    def on(cls, workdir: Path, database_url: str, **overrides: str) -> RunningService:
        """A service on a free port, over this database, with these settings overridden."""
        port = free_port()
        return cls(
            workdir=workdir, port=port, env=service_env(workdir, database_url, port, **overrides)
        )

    def exited(self, timeout: float) -> int:
        """Wait for the service to end by itself; its exit status."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the service and its worker processes at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medreid.cli", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--format", "json").stdout)


DEFAULT_MODELS = Path(__file__).resolve().parents[1] / "models"


@cache
def generated_image_model_set() -> Path:
    """The default models save those fitted on real images, once per process: what judges
    the generated hospitals of the end-to-end tests and benchmarks."""
    return generated_image_models(
        DEFAULT_MODELS, Path(tempfile.mkdtemp(prefix="medreid-generated-models-"))
    )


def service_env(workdir: Path, database_url: str, port: int, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "MEDREID_DATABASE_URL": database_url,
            "MEDREID_SPOOL_DIR": str(workdir / "spool"),
            "MEDREID_SCP_PORT": str(port),
            "MEDREID_SCP_BIND_ADDRESS": "127.0.0.1",
            "MEDREID_METRICS_PORT": "0",  # any free port; a test that scrapes names one
            "MEDREID_SPOOL_MIN_FREE_MB": "64",
            "MEDREID_WORKERS_POLL_INTERVAL_S": "0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def first_visit_gallery(hospital: Path, rows: list[dict[str, str]], out: Path) -> Path:
    """Copy visit 1 of a generated hospital into ``out`` in the dataset layout (the folders
    are the true identities), as a gallery built from verified earlier studies would be."""
    for row in rows:
        if row["visit"] == "1":
            target = out / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(hospital / row["path"], target)
    return out


def wait_for_queue(sessions: sessionmaker[Session], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions.begin() as session:
            open_jobs = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state.in_([JobState.PENDING, JobState.RUNNING]))
            )
        if open_jobs == 0:
            return
        time.sleep(0.25)
    raise TimeoutError("the job queue did not drain")


def send_with_storescu(path: Path, port: int, calling: str = "STORESCU") -> bool:
    """One file, one association, proposing the file's own transfer syntax. True on Success."""
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    proposal = DCMTK_PROPOSALS.get(syntax, [])
    completed = subprocess.run(
        [
            "storescu",
            "-aet",
            calling,
            "-aec",
            "MEDREID",
            "-R",
            *proposal,
            "127.0.0.1",
            str(port),
            str(path),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},  # DCMTK as packaged leaves Nagle on otherwise
        capture_output=True,
        timeout=60,
    )
    return completed.returncode == 0


def send_with_pynetdicom(path: Path, port: int, calling: str = "PYNETDICOM") -> int | None:
    """Send a file's bytes as they are; the C-STORE status, or None if nothing was sent."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [UID(meta.TransferSyntaxUID)])
    assoc = guard_requests(ae.associate("127.0.0.1", port, ae_title="MEDREID"))
    if not assoc.is_established:
        return None
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    except Exception:
        return None
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
