"""The command line as a user runs it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medreid.cli import main
from medreid.logs import MaskingFormatter
from medreid.output import parse_when, render
from storage import audit
from storage.audit_trail import append_audit
from tests.conftest import Database


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medreid.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def test_an_invalid_value_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[scp]\nport = 0\n")
    completed = run("--config", str(config), "serve")
    assert completed.returncode == 2
    assert "scp.port" in completed.stderr


def test_serve_refuses_a_database_that_is_not_at_head(tmp_path: Path) -> None:
    env = {
        "MEDREID_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        "MEDREID_SPOOL_DIR": str(tmp_path / "spool"),
        "PATH": "/usr/bin:/bin",
    }
    completed = run("serve", env=env, cwd=tmp_path)
    assert completed.returncode == 3
    assert "medreid db upgrade" in completed.stderr
    upgraded = run("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    current = run("db", "current", env=env, cwd=tmp_path)
    assert current.returncode == 0 and "up to date" in current.stdout


def test_config_prints_every_effective_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDREID_SCP_PORT", "4242")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "scp.port = 4242" in out and "clahe.tile_grid = [8, 8]" in out


@pytest.mark.db
def test_audit_listing_is_itself_audited(
    database: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDREID_DATABASE_URL", database.url)
    with database.sessions.begin() as session:
        append_audit(
            session,
            record=audit.AuditRecord(
                kind=audit.ASSOCIATION_REJECTED,
                actor_ae="ROGUE",
                outcome=audit.Outcome.MINOR_FAILURE,
            ),
        )
    assert main(["audit", "--format", "json", "--event", "Security Alert"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [e["actor_ae"] for e in first] == ["ROGUE"]
    assert main(["audit", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("id,occurred_at,event")
    assert any("Audit Log Used" in line for line in lines[1:])
    assert main(["audit", "--since", "1h", "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "Security Alert" in table and "rows)" in table


@pytest.mark.db
def test_results_are_filtered_as_the_console_filters_them(
    database: Database,
    hospital: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One filter, one meaning: --since is by arrival (the results were all made today, three
    arrived on the day asked for), --patient is the header or the matched patient."""
    monkeypatch.setenv("MEDREID_DATABASE_URL", database.url)

    def listed(*args: str) -> list[int]:
        assert main(["results", *args, "--format", "json"]) == 0
        return [row["id"] for row in json.loads(capsys.readouterr().out)]

    ids = hospital.results
    arrived = listed("--since", "2026-11-26T00:00:00+00:00")
    assert arrived == sorted(ids[name] for name in ("swap", "wrong", "script"))
    assert listed("--patient", "P3") == [ids["swap"]]  # matched; the header says P2
    assert listed("--patient", "P2") == [ids["swap"]]
    assert listed("--verdict", "mismatch") == sorted([ids["swap"], ids["wrong"]])
    # the newest results (by id) up to the limit
    assert listed("--since", "2026-11-26T00:00:00+00:00", "--limit", "1") == [ids["script"]]
    assert main(["instances", "--patient", "P4", "--format", "json"]) == 0
    (instance,) = json.loads(capsys.readouterr().out)
    assert (instance["patient_id"], instance["modality"], instance["calling_ae"]) == (
        "P4",
        "DX",
        "XR2",
    )
    assert {"sha256", "peer_host", "timings_ms", "failure_reason"} <= set(instance)


def test_relative_and_absolute_times() -> None:
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC)
    assert parse_when("30m", now) == dt.datetime(2026, 1, 2, 11, 30, tzinfo=dt.UTC)
    assert parse_when("2026-01-01", now) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="relative time"):
        parse_when("yesterday", now)


def test_render_formats() -> None:
    rows: list[dict[str, Any]] = [{"a": 1, "b": {"x": [1, 2]}}, {"a": None, "b": "text,with comma"}]
    assert json.loads(render(rows, "json", ["a", "b"]))[0]["b"] == {"x": [1, 2]}
    csv_text = render(rows, "csv", ["a", "b"])
    assert csv_text.splitlines()[2] == ',"text,with comma"'
    assert render(rows, "table", ["a", "b"]).endswith("(2 rows)")


def test_secrets_are_masked_in_config_errors_and_log_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDREID_DATABASE_URL", "postgresql+psycopg://medreid:s3cret%21@db:5432/x")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "database.url = postgresql+psycopg://medreid:***@db:5432/x" in out
    assert "s3cret" not in out
    monkeypatch.setenv("MEDREID_DATABASE_URL", "medreid:s3cret@db")  # no scheme: invalid
    assert main(["config"]) == 2
    assert "s3cret" not in capsys.readouterr().err
    record = logging.LogRecord(
        "storage", logging.ERROR, __file__, 1, "cannot reach %s", ("http://u:pw@h/",), None
    )
    assert MaskingFormatter("%(message)s").format(record) == "cannot reach http://u:***@h/"


def test_what_the_commands_create_is_private_to_the_services_user(tmp_path: Path) -> None:
    env = {**os.environ, "MEDREID_DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'm.sqlite3'}"}
    assert run("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    assert (tmp_path / "db" / "m.sqlite3").stat().st_mode & 0o777 == 0o600
    grouped = {**env, "MEDREID_SPOOL_GROUP_READABLE": "true"}
    grouped["MEDREID_DATABASE_URL"] = f"sqlite:///{tmp_path / 'g.sqlite3'}"
    assert run("db", "upgrade", env=grouped, cwd=tmp_path).returncode == 0
    assert (tmp_path / "g.sqlite3").stat().st_mode & 0o777 == 0o640


def test_json_log_lines_carry_the_context_and_mask_secrets() -> None:
    import json

    from medreid.logs import JsonFormatter

    record = logging.LogRecord(
        "scp.server",
        logging.WARNING,
        __file__,
        1,
        "refused by %s",
        ("postgresql://u:pw@h/db",),
        None,
    )
    record.association = 7
    record.sop_instance_uid = "1.2.3"
    line = json.loads(JsonFormatter("worker-1").format(record))
    assert line["level"] == "WARNING" and line["logger"] == "scp.server"
    assert line["process"] == "worker-1"
    assert line["association"] == 7 and line["sop_instance_uid"] == "1.2.3"
    assert "job_id" not in line
    assert line["message"] == "refused by postgresql://u:***@h/db"


def test_json_logs_keep_warnings_native_lines_and_a_dying_traceback_as_json() -> None:
    import json
    import subprocess

    program = (
        "import os, time, warnings\n"
        "from medreid.logs import configure_logging\n"
        "from medreid.settings import load_settings\n"
        "configure_logging(load_settings(None, env={'MEDREID_LOGGING_FORMAT': 'json'}))\n"
        "warnings.warn('a warning')\n"
        "os.write(2, b'a native library line\\n')\n"
        "time.sleep(0.2)\n"
        "raise RuntimeError('boom')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("py.warnings", "WARNING"),
        ("native", "INFO"),
        ("medreid", "CRITICAL"),
    ]
    assert "RuntimeError: boom" in lines[2]["exception"]
    assert done.returncode == 1
