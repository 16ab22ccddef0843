"""How the command line and the service's processes log: text or JSON lines, secrets masked.

Library code only calls ``logging.getLogger(__name__)``; a record may carry the context of
its work as ``extra`` fields, which JSON lines keep as keys of their own:
``association`` (the association's row id), ``sop_instance_uid``, ``job_id`` and ``worker``.
Patient names and IDs are never passed to a log call.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import threading
from typing import TextIO

from medreid.settings import LogFormat, Settings, mask_secrets

CONTEXT_FIELDS = ("association", "sop_instance_uid", "job_id", "worker")


class MaskingFormatter(logging.Formatter):
    """Formats a record, then masks any URL password in it (a database URL in an error)."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, process, message, the
    record's context fields, and the exception's traceback where there is one."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process_name,
            "pid": record.process,
            "message": mask_secrets(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def _json_lines_on_stderr(process_name: str) -> TextIO:
    """Native libraries (TensorFlow's C++ runtime) write plain lines to file descriptor 2.
    With JSON logs, descriptor 2 becomes a pipe whose lines are wrapped as JSON objects
    (logger "native") on the real stderr; the stream returned, and sys.stderr, write there
    directly."""
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    lock = threading.Lock()

    def relay() -> None:
        with os.fdopen(read_end, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                if not text.startswith("{"):
                    text = json.dumps(
                        {
                            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                            "level": "INFO",
                            "logger": "native",
                            "process": process_name,
                            "pid": os.getpid(),
                            "message": mask_secrets(text),
                        }
                    )
                with lock:
                    real.write(text + "\n")

    threading.Thread(target=relay, name="medreid-native-stderr", daemon=True).start()
    # Python's own writes (a traceback as the process dies, the command line's messages) go
    # to the real stderr directly: through the pipe, the last of them could be lost at exit.
    sys.stderr = real
    return real


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: object) -> None:
    logging.getLogger("medreid").critical(
        "uncaught %s",
        kind.__name__,
        exc_info=(kind, value, tb),  # type: ignore[arg-type]
    )


def configure_logging(settings: Settings | None, process_name: str = "main") -> None:
    """Send the process's log to stderr, as text or JSON lines per ``logging.format``."""
    level = settings.logging.level.upper() if settings else "INFO"
    handler = logging.StreamHandler(sys.stderr)
    if settings is not None and settings.logging.format == LogFormat.JSON:
        handler = logging.StreamHandler(_json_lines_on_stderr(process_name))
        handler.setFormatter(JsonFormatter(process_name))
        # warnings and a dying process's traceback as JSON lines too
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
    else:
        prefix = "" if process_name == "main" else f"{process_name} "
        handler.setFormatter(
            MaskingFormatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        )
    logging.basicConfig(level=level, handlers=[handler])
    if level != "DEBUG":
        # Alembic and pynetdicom narrate every step at INFO; keep the service log readable.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
