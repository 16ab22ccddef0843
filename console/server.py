"""Serving the console beside the SCP: uvicorn in a thread of `medreid serve`."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class ConsoleServer:
    def __init__(
        self,
        app: FastAPI,
        *,
        host: str,
        port: int,
        certificate: str = "",
        private_key: str = "",
    ) -> None:
        self.host, self.port = host, port
        self.https = bool(certificate)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            # uvicorn's access log prints query strings, which hold patient IDs: the app logs
            # each request by its route instead.
            access_log=False,
            log_config=None,
            lifespan="off",
            ssl_certfile=certificate or None,
            ssl_keyfile=private_key or None,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}/"

    def start(self, timeout_s: float = 30.0) -> None:
        """Listen, or raise where the port cannot be bound."""
        self._thread = threading.Thread(target=self._server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the console could not listen on {self.host}:{self.port}")
            time.sleep(0.05)
        log.info("console at %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
