"""Alembic is the only way the schema changes: the migrations build exactly the models."""

from __future__ import annotations

from pathlib import Path

import pytest
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
from tests.conftest import Database

pytestmark = pytest.mark.db


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
