"""Alembic is the only way the schema changes: the migrations build exactly the models."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage.db import (
    SchemaNotCurrentError,
    current_revision,
    head_revision,
    make_engine,
    require_current_schema,
    upgrade,
)
from storage.models import Base
from tests.conftest import Database, empty_database_url

pytestmark = pytest.mark.db


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url_at_base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (no migration run), once per backend."""
    yield from empty_database_url(request.param, tmp_path)


def test_migrations_produce_the_models(database: Database) -> None:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    assert current_revision(database.engine) == head_revision(database.url)
    require_current_schema(database.engine)  # does not raise


def test_an_empty_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    with pytest.raises(SchemaNotCurrentError, match="run `medreid db upgrade`"):
        require_current_schema(engine)
    engine.dispose()


def test_downgrade_and_upgrade_round_trip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rt.sqlite3'}"
    upgrade(url)
    upgrade_target = head_revision(url)
    from alembic import command

    from storage.db import alembic_config

    command.downgrade(alembic_config(url), "base")
    engine = make_engine(url)
    assert current_revision(engine) is None
    upgrade(url)
    assert current_revision(engine) == upgrade_target
    engine.dispose()


# ---------------------------------------------------------------------------- with data

EARLIER_REVISIONS = ["0001", "0002", "0003", "0004", "0005"]
WHEN = dt.datetime(2026, 11, 2, 8, 30, 0)


def _value(column: sa.Column[Any], n: int) -> Any:
    """A value of the column's type; every key is ``n``, so foreign keys meet their rows."""
    kind = column.type
    if isinstance(kind, sa.Boolean):
        return n % 2 == 0
    if isinstance(kind, sa.Integer):
        return n
    if isinstance(kind, sa.Float | sa.Numeric):
        return 0.25 * n
    if isinstance(kind, sa.DateTime):
        return WHEN + dt.timedelta(minutes=n)
    if isinstance(kind, sa.JSON):
        return {"kept": n, "list": [1, 2]}
    if isinstance(kind, sa.LargeBinary):
        return bytes([n]) * 16
    if isinstance(kind, sa.String):
        length = kind.length or 64
        return f"{column.name[:3]}{n}"[:length]
    raise AssertionError(f"no test value for {column.table.name}.{column.name}: {kind!r}")


def _fill(engine: sa.Engine) -> dict[str, list[dict[str, Any]]]:
    """Two rows in every table of the database as it is, in foreign-key order."""
    metadata = sa.MetaData()
    metadata.reflect(engine)
    rows: dict[str, list[dict[str, Any]]] = {}
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            if table.name == "alembic_version":
                continue
            rows[table.name] = [{c.name: _value(c, n) for c in table.columns} for n in (1, 2)]
            connection.execute(table.insert(), rows[table.name])
    return rows


def _normal(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


@pytest.mark.parametrize("revision", EARLIER_REVISIONS)
def test_a_filled_database_at_an_earlier_revision_upgrades_with_its_rows(
    database_url_at_base: str, revision: str
) -> None:
    url = database_url_at_base
    from alembic import command

    from storage.db import alembic_config

    command.upgrade(alembic_config(url), revision)
    engine = make_engine(url)
    try:
        before = _fill(engine)
        assert {"instances", "jobs", "results", "audit_events"} <= set(before)
        upgrade(url)
        assert current_revision(engine) == head_revision(url)
        metadata = sa.MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for name, expected in before.items():
                table = metadata.tables[name]
                order = [table.c[c.name] for c in table.primary_key.columns]
                found = [
                    dict(r._mapping) for r in connection.execute(table.select().order_by(*order))
                ]
                assert len(found) == len(expected), name
                for was, now in zip(expected, found, strict=True):
                    assert {k: _normal(now[k]) for k in was} == {
                        k: _normal(v) for k, v in was.items()
                    }, name
        # the audit trail is still append-only
        for statement in ("UPDATE audit_events SET detail = NULL", "DELETE FROM audit_events"):
            with pytest.raises(sa.exc.DBAPIError), engine.begin() as connection:
                connection.execute(sa.text(statement))
        if engine.dialect.name == "postgresql":
            with pytest.raises(sa.exc.DBAPIError), engine.begin() as connection:
                connection.execute(sa.text("TRUNCATE audit_events CASCADE"))
        with engine.connect() as connection:
            kept = connection.scalar(sa.text("SELECT count(*) FROM audit_events"))
        assert kept == len(before["audit_events"])
    finally:
        engine.dispose()


def test_the_stored_mismatches_become_open_alerts(database_url_at_base: str) -> None:
    """0006: one open alert for each mismatch already stored, of an image or a series."""
    url = database_url_at_base
    from alembic import command

    from storage.db import alembic_config

    command.upgrade(alembic_config(url), "0005")
    engine = make_engine(url)
    try:
        _fill(engine)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE results SET identity_verdict = 'mismatch' WHERE id = 1")
            )
            connection.execute(
                sa.text("UPDATE series_verdicts SET modality_verdict = 'mismatch' WHERE id = 2")
            )
        upgrade(url)
        with engine.connect() as connection:
            alerts = [
                dict(r._mapping)
                for r in connection.execute(sa.text("SELECT * FROM alerts ORDER BY scope"))
            ]
        assert [(a["kind"], a["scope"], a["state"]) for a in alerts] == [
            ("patient_mismatch", "image", "open"),
            ("modality_mismatch", "series", "open"),
        ]
        image, series = alerts
        assert (image["result_id"], image["series_verdict_id"]) == (1, None)
        assert image["patient_id"] == "pat1" and image["suspected_patient_id"] == "mat1"
        assert image["sop_instance_uid"] == "sop1" and image["raised_by"] == "wor1"
        assert (series["result_id"], series["series_verdict_id"]) == (None, 2)
        assert series["series_instance_uid"] == "ser2" and series["suspected_patient_id"] is None
    finally:
        engine.dispose()
