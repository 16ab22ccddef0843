from __future__ import annotations

from pathlib import Path

import pytest

from medreid.settings import DEFAULT_CONFIG, SettingsError, load_settings


def test_packaged_file_holds_the_documented_defaults() -> None:
    settings = load_settings(DEFAULT_CONFIG, env={})
    assert settings.scp.ae_title == "MEDREID"
    assert settings.scp.port == 11112
    assert settings.database.url == "sqlite:///var/medreid.sqlite3"
    assert settings.clahe.tile_grid == (8, 8)
    # Every modality is re-identified unless the hospital leaves one out.
    assert settings.analysis.identity_modalities == ("xray", "ct", "mri", "dermoscopy")
    # The console is off, and on loopback once turned on.
    assert not settings.console.enabled
    assert settings.console.bind_address == "127.0.0.1"


def test_environment_overrides_every_kind_of_value() -> None:
    settings = load_settings(
        DEFAULT_CONFIG,
        env={
            "MEDREID_SCP_PORT": "11113",
            "MEDREID_SCP_ALLOWED_PEERS": "PACS@127.0.0.1, CT1",
            "MEDREID_SCP_REQUIRE_CALLED_AE": "false",
            "MEDREID_DATABASE_URL": "postgresql+psycopg://db/medreid",
            "MEDREID_CLAHE_CLIP_LIMIT": "3.5",
            "MEDREID_SPOOL_DIR": "/data/spool",
            "MEDREID_ANALYSIS_IDENTITY_MODALITIES": "xray, dermoscopy",
        },
    )
    assert settings.scp.port == 11113
    assert settings.scp.allowed_peers == ("PACS@127.0.0.1", "CT1")
    assert settings.scp.require_called_ae is False
    assert settings.database.url == "postgresql+psycopg://db/medreid"
    assert settings.clahe.clip_limit == 3.5
    assert settings.spool.dir == Path("/data/spool")
    assert settings.analysis.identity_modalities == ("xray", "dermoscopy")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MEDREID_SCP_PORT": "eleven"}, "scp.port"),
        ({"MEDREID_SCP_PORT": "70000"}, "scp.port"),
        ({"MEDREID_SCP_AE_TITLE": "A_TITLE_LONGER_THAN_16"}, "scp.ae_title"),
        ({"MEDREID_WORKERS_PROCESSES": "-1"}, "workers.processes"),
        ({"MEDREID_SPOOL_RECONCILE_SETTLE_S": "-5"}, "spool.reconcile_settle_s"),
        ({"MEDREID_DECODE_FRAMES": "some"}, "decode.frames"),
        ({"MEDREID_SCP_REQUIRE_CALLED_AE": "perhaps"}, "scp.require_called_ae"),
        ({"MEDREID_CLAHE_TILE_GRID": "8"}, "clahe.tile_grid"),
        ({"MEDREID_DATABASE_URL": "medreid.sqlite3"}, "database.url"),
        ({"MEDREID_SCP_TLS_CERTIFICATE": "/no/such/cert.pem"}, "scp.tls_private_key"),
        (
            {
                "MEDREID_SCP_TLS_CERTIFICATE": "/no/such/cert.pem",
                "MEDREID_SCP_TLS_PRIVATE_KEY": "/no/such/key.pem",
            },
            "scp.tls_certificate",
        ),
        ({"MEDREID_SCP_TLS_REQUIRE_CLIENT_CERTIFICATE": "true"}, "scp.tls_ca_certificates"),
        ({"MEDREID_ANALYSIS_SERIES_QUIET_S": "-1"}, "analysis.series_quiet_s"),
        ({"MEDREID_ANALYSIS_SERIES_MODALITIES": "ct"}, "analysis.series_modalities"),
        ({"MEDREID_ANALYSIS_IDENTITY_MODALITIES": "xray, CT"}, "analysis.identity_modalities"),
        (
            {"MEDREID_CONSOLE_ENABLED": "true", "MEDREID_CONSOLE_BIND_ADDRESS": "0.0.0.0"},
            "console.bind_address",
        ),
        ({"MEDREID_CONSOLE_SESSION_IDLE_MIN": "0"}, "console.session_idle_min"),
        ({"MEDREID_CONSOLE_TLS_CERTIFICATE": "/no/such/cert.pem"}, "console.tls_private_key"),
        ({"MEDREID_METRICS_PORT": "70000"}, "metrics.port"),
        ({"MEDREID_METRICS_STARTUP_TIMEOUT_S": "0"}, "metrics.startup_timeout_s"),
        ({"MEDREID_LOGGING_FORMAT": "xml"}, "logging.format"),
    ],
)
def test_an_invalid_value_names_its_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(DEFAULT_CONFIG, env=env)
    assert str(caught.value).startswith(key)


def test_unknown_keys_and_wrong_types_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "medreid.toml"
    config.write_text("[scp]\nprot = 104\n")
    with pytest.raises(SettingsError, match=r"^scp\.prot: unknown key"):
        load_settings(config, env={})
    config.write_text('[scp]\nport = "104"\n')
    with pytest.raises(SettingsError, match=r"^scp\.port: expected an integer"):
        load_settings(config, env={})
    config.write_text("[spooll]\n")
    with pytest.raises(SettingsError, match=r"^spooll: unknown section"):
        load_settings(config, env={})


def test_a_partial_file_keeps_the_defaults_for_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "medreid.toml"
    config.write_text('[scp]\nae_title = "ARCHIVE"\n')
    settings = load_settings(config, env={})
    assert settings.scp.ae_title == "ARCHIVE"
    assert settings.scp.port == 11112


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", env={})


def test_the_worker_judges_identity_only_for_the_modalities_set() -> None:
    from sqlalchemy.orm import sessionmaker

    from medreid.processes import build_analyser

    models = Path(__file__).resolve().parents[1] / "models"
    settings = load_settings(
        DEFAULT_CONFIG,
        env={"MEDREID_ANALYSIS_IDENTITY_MODALITIES": "xray", "MEDREID_MODELS_DIR": str(models)},
    )
    analyser = build_analyser(settings, sessionmaker())
    assert analyser is not None
    assert analyser.identity_modalities == frozenset({"xray"})
