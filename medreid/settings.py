"""Typed settings: one TOML file, overridden by MEDREID_<SECTION>_<KEY> environment variables.

Loading fails fast with :class:`SettingsError`, whose message names the offending key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from medreid.outbox_settings import OutboxSettings, WebhookSettings
from medreid.priors_settings import PriorsSettings
from pipeline.records import Modality
from scp.settings import ScpSettings, check_range

ENV_PREFIX = "MEDREID_"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "medreid.toml"


class SettingsError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


__all__ = ["ScpSettings", "Settings", "SettingsError", "load_settings"]


@dataclass(frozen=True)
class SpoolSettings:
    dir: Path = Path("var/spool")
    min_free_mb: int = 512
    fsync: bool = True
    # false: what the service writes (spool, SQLite database) is its user's alone (0600 / 0700)
    group_readable: bool = False
    # a file written this recently may be another service's on a shared spool, between its
    # write and its commit: start-up reconciliation judges it this long after the start instead
    reconcile_settle_s: float = 120.0

    def validate(self) -> None:
        check_range("spool.min_free_mb", self.min_free_mb, 0, 2**40)
        check_range("spool.reconcile_settle_s", self.reconcile_settle_s, 0.0, 86_400.0)


# the password of a URL: scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)")


def mask_secrets(text: str) -> str:
    """The text with the password of any URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***", text)


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///var/medreid.sqlite3"
    busy_timeout_s: float = 30.0

    def validate(self) -> None:
        if "://" not in self.url:
            # not repeated: what is not a URL may still hold a password
            raise SettingsError("database.url: not a database URL (dialect://user@host/name)")
        check_range("database.busy_timeout_s", self.busy_timeout_s, 0.0, 3600.0)


@dataclass(frozen=True)
class WorkerSettings:
    processes: int = 1
    batch_size: int = 8
    poll_interval_s: float = 0.5
    lease_s: float = 300.0
    max_attempts: int = 3

    def validate(self) -> None:
        check_range("workers.processes", self.processes, 0, 64)
        check_range("workers.batch_size", self.batch_size, 1, 1024)
        check_range("workers.poll_interval_s", self.poll_interval_s, 0.01, 60.0)
        check_range("workers.lease_s", self.lease_s, 1.0, 86400.0)
        check_range("workers.max_attempts", self.max_attempts, 1, 100)


FRAME_POLICIES = ("first", "middle", "all")


@dataclass(frozen=True)
class DecodeSettings:
    frames: str = "middle"
    max_frames: int = 16

    def validate(self) -> None:
        if self.frames not in FRAME_POLICIES:
            raise SettingsError(
                f"decode.frames: {self.frames!r} is not one of {', '.join(FRAME_POLICIES)}"
            )
        check_range("decode.max_frames", self.max_frames, 1, 10000)


@dataclass(frozen=True)
class ClaheSettings:
    clip_limit: float = 2.0
    tile_grid: tuple[int, ...] = (8, 8)

    def validate(self) -> None:
        check_range("clahe.clip_limit", self.clip_limit, 0.0, 1000.0)
        if len(self.tile_grid) != 2 or any(not 1 <= t <= 256 for t in self.tile_grid):
            raise SettingsError(
                f"clahe.tile_grid: {list(self.tile_grid)} must be two integers from 1 to 256"
            )


@dataclass(frozen=True)
class ModelsSettings:
    dir: Path = Path("models")

    def validate(self) -> None:
        pass


KNOWN_MODALITIES = tuple(str(m) for m in Modality)


@dataclass(frozen=True)
class AnalysisSettingsSection:
    enabled: bool = True
    tag_map: tuple[str, ...] = (
        "CR=xray",
        "DX=xray",
        "RG=xray",
        "CT=ct",
        "MR=mri",
        "DMS=dermoscopy",
        "XC=dermoscopy",
    )
    on_disagreement: str = "prediction"
    top_k: int = 5
    mismatch_margin: float = 0.1
    auto_enroll_new_patients: bool = False
    series_modalities: tuple[str, ...] = ("CT", "MR")
    series_quiet_s: float = 30.0
    identity_modalities: tuple[str, ...] = KNOWN_MODALITIES

    def validate(self) -> None:
        for entry in self.tag_map:
            code, _, modality = entry.partition("=")
            if not code.strip() or modality.strip() not in KNOWN_MODALITIES:
                raise SettingsError(
                    f"analysis.tag_map: {entry!r} is not CODE=modality with modality one of "
                    f"{', '.join(KNOWN_MODALITIES)}"
                )
        if self.on_disagreement not in ("prediction", "hold"):
            raise SettingsError(
                f"analysis.on_disagreement: {self.on_disagreement!r} is not prediction or hold"
            )
        check_range("analysis.top_k", self.top_k, 1, 100)
        check_range("analysis.mismatch_margin", self.mismatch_margin, 0.0, 2.0)
        check_range("analysis.series_quiet_s", self.series_quiet_s, 0.0, 86400.0)
        for code in self.series_modalities:
            if not code.strip() or code.strip().upper() != code.strip() or len(code) > 16:
                raise SettingsError(
                    f"analysis.series_modalities: {code!r} is not an upper-case Modality code"
                )
        for modality in self.identity_modalities:
            if modality not in KNOWN_MODALITIES:
                raise SettingsError(
                    f"analysis.identity_modalities: {modality!r} is not one of "
                    f"{', '.join(KNOWN_MODALITIES)}"
                )

    def tag_mapping(self) -> dict[str, str]:
        pairs = (entry.partition("=") for entry in self.tag_map)
        return {code.strip().upper(): modality.strip() for code, _, modality in pairs}


LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ConsoleSettings:
    """The web console (it changes nothing but alerts' reviews): off by default, on loopback
    when on."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = 8080
    # HTTPS when both are set (PEM files).
    tls_certificate: str = ""
    tls_private_key: str = ""
    # Passwords and session cookies cross the network in clear without TLS: off loopback,
    # that takes this explicit opt-in.
    allow_plain_http_off_loopback: bool = False
    # A browser session ends after this long without a request, and at the latest after
    # session_max_h hours.
    session_idle_min: float = 15.0
    session_max_h: float = 8.0
    # Lifetime of an API token made by `medreid users token`.
    api_token_days: int = 30
    # Rows a page or a JSON listing returns at most; CSV exports take up to export_max_rows.
    page_rows: int = 100
    export_max_rows: int = 100000
    # Failed logins of one user name from one address within lockout_window_min, before that
    # name is refused from that address until the failures age out (`medreid users unlock`
    # ends it at once); and of any names from one address, before the address is refused.
    lockout_failures: int = 5
    lockout_failures_per_address: int = 20
    lockout_window_min: float = 15.0

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_certificate)

    def validate(self) -> None:
        check_range("console.port", self.port, 1, 65535)
        check_range("console.session_idle_min", self.session_idle_min, 1.0, 24 * 60.0)
        check_range("console.session_max_h", self.session_max_h, 0.1, 24 * 7.0)
        check_range("console.api_token_days", self.api_token_days, 1, 3650)
        check_range("console.page_rows", self.page_rows, 10, 1000)
        check_range("console.export_max_rows", self.export_max_rows, 100, 10_000_000)
        check_range("console.lockout_failures", self.lockout_failures, 1, 1000)
        check_range(
            "console.lockout_failures_per_address", self.lockout_failures_per_address, 1, 100000
        )
        check_range("console.lockout_window_min", self.lockout_window_min, 1.0, 24 * 60.0)
        if not self.bind_address.strip():
            raise SettingsError("console.bind_address: must not be empty")
        if self.tls_enabled and not self.tls_private_key:
            raise SettingsError("console.tls_private_key: required with console.tls_certificate")
        for key in ("tls_certificate", "tls_private_key"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise SettingsError(f"console.{key}: {path} is not a readable file")
        if (
            self.enabled
            and self.bind_address not in LOOPBACK_ADDRESSES
            and not self.tls_enabled
            and not self.allow_plain_http_off_loopback
        ):
            raise SettingsError(
                f"console.bind_address: {self.bind_address} is not loopback, and without "
                "console.tls_certificate passwords would cross the network in clear "
                "(set a certificate, or console.allow_plain_http_off_loopback = true)"
            )


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics (/metrics) and health (/healthz, /readyz) on their own listener,
    on loopback by default, whether or not the console is on."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = 9464
    # `medreid serve` exits non-zero when it is not ready (database, spool, models, workers)
    # this long after it starts.
    startup_timeout_s: float = 180.0

    def validate(self) -> None:
        check_range("metrics.port", self.port, 0, 65535)
        check_range("metrics.startup_timeout_s", self.startup_timeout_s, 1.0, 3600.0)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"  # one JSON object a line


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    format: str = LogFormat.TEXT

    def validate(self) -> None:
        if self.level.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"logging.level: {self.level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if self.format not in set(LogFormat):
            raise SettingsError(
                f"logging.format: {self.format!r} is not one of {', '.join(LogFormat)}"
            )


@dataclass(frozen=True)
class Settings:
    scp: ScpSettings = field(default_factory=ScpSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    clahe: ClaheSettings = field(default_factory=ClaheSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    analysis: AnalysisSettingsSection = field(default_factory=AnalysisSettingsSection)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    priors: PriorsSettings = field(default_factory=PriorsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


def _coerce(key: str, raw: Any, target: Any, from_env: bool) -> Any:
    """Convert a TOML or environment value to the declared field type, or name the key."""
    origin = typing.get_origin(target)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(target)
        if from_env and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple):
            raise SettingsError(f"{key}: expected a list, got {raw!r}")
        return tuple(_coerce(f"{key}[]", item, item_type, from_env) for item in raw)
    if target is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and isinstance(raw, str) and raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if from_env and isinstance(raw, str) and raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{key}: expected true or false, got {raw!r}")
    if target is int or target is float:
        noun = "an integer" if target is int else "a number"
        if isinstance(raw, bool) or not (from_env or isinstance(raw, int | float)):
            raise SettingsError(f"{key}: expected {noun}, got {raw!r}")
        if target is int and isinstance(raw, float):
            raise SettingsError(f"{key}: expected {noun}, got {raw!r}")
        try:
            return target(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{key}: expected {noun}, got {raw!r}") from None
    if target is Path:
        if not isinstance(raw, str) or not raw:
            raise SettingsError(f"{key}: expected a path, got {raw!r}")
        return Path(raw)
    if target is str:
        if not isinstance(raw, str):
            raise SettingsError(f"{key}: expected a string, got {raw!r}")
        return raw
    raise SettingsError(f"{key}: unsupported setting type {target!r}")  # pragma: no cover


def _build_section(
    name: str, cls: type, file_values: Mapping[str, Any], env: Mapping[str, str]
) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in file_values:
        if key not in known:
            raise SettingsError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        env_name = f"{ENV_PREFIX}{name}_{f.name}".upper()
        if env_name in env:
            values[f.name] = _coerce(key, env[env_name], hints[f.name], from_env=True)
        elif f.name in file_values:
            values[f.name] = _coerce(key, file_values[f.name], hints[f.name], from_env=False)
    section = cls(**values)
    try:
        section.validate()
    except SettingsError:
        raise
    except ValueError as exc:  # a section owned by another package (scp) names its key too
        raise SettingsError(str(exc)) from None
    return section


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (the packaged defaults when ``path`` is None) and the environment."""
    env = os.environ if env is None else env
    config_path = path or (Path(env["MEDREID_CONFIG"]) if env.get("MEDREID_CONFIG") else None)
    config_path = config_path or DEFAULT_CONFIG
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {config_path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {config_path}: {exc}") from None
    sections = {f.name: f.type for f in dataclasses.fields(Settings)}
    hints = typing.get_type_hints(Settings)
    for name in data:
        if name not in sections:
            raise SettingsError(f"{name}: unknown section (known: {', '.join(sorted(sections))})")
    built: dict[str, Any] = {}
    for name in sections:
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise SettingsError(f"{name}: expected a table")
        built[name] = _build_section(name, hints[name], raw, env)
    return Settings(**built)


def describe(settings: Settings) -> list[tuple[str, str]]:
    """Every key and its effective value, for `medreid config`."""
    rows: list[tuple[str, str]] = []
    for section in dataclasses.fields(settings):
        obj = getattr(settings, section.name)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, tuple):
                value = list(value)
            shown = "***" if f.name == "secret" and value else mask_secrets(str(value))
            rows.append((f"{section.name}.{f.name}", shown))
    return rows
