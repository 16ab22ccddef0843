"""The JSON API against its own OpenAPI description: schemathesis generates requests from the
description (valid and invalid parameters) and checks that every answer conforms to it, that
no request makes a server error, and that every operation refuses the unauthenticated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from console.app import ConsoleContext, create_app
from console.passwords import new_token, token_digest
from pipeline.runner import PipelineConfig
from storage.accounts import find_user, open_session
from storage.db import make_engine, make_sessionmaker, upgrade
from storage.models import SessionKind
from tests.conftest import Database
from tests.console_fixtures import NOW, Clock, add_console_user, fill

TOKEN = new_token()


@pytest.fixture(scope="module")
def console_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    folder = tmp_path_factory.mktemp("openapi")
    url = f"sqlite:///{folder / 'console.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    database = Database("sqlite", url, engine)
    fill(database, folder / "spool")
    add_console_user(database)
    with database.sessions.begin() as session:
        user = find_user(session, username="admin")
        assert user is not None
        open_session(
            session,
            user=user,
            kind=SessionKind.API,
            token_sha256=token_digest(TOKEN),
            csrf_token=None,
            client_host=None,
            now=NOW,
            expires_at=NOW.replace(year=2100),
        )
    yield create_app(
        ConsoleContext(
            sessions=make_sessionmaker(engine),
            spool_root=folder / "spool",
            pipeline=PipelineConfig(),
            clock=Clock(),
        )
    )
    engine.dispose()


@pytest.fixture(scope="module")
def api_schema(console_app: FastAPI) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_asgi("/api/openapi.json", console_app)


OPERATIONS = [
    "/api/v1/dashboard",
    "/api/v1/results",
    "/api/v1/results/{result_id}",
    "/api/v1/results/{result_id}/thumbnail.png",
    "/api/v1/series",
    "/api/v1/audit",
    "/api/v1/audit.csv",
    "/api/v1/alerts",
    "/api/v1/alerts/{alert_id}",
]


@pytest.mark.parametrize("path", OPERATIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_to_the_description(
    api_schema: schemathesis.schemas.BaseSchema, path: str, mode: GenerationMode
) -> None:
    """Valid parameters get answers as described; invalid ones a described refusal (422)."""
    operation = api_schema[path]["GET"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,  # the same requests on every run
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})

    check()


def test_the_description_covers_the_api_and_its_refusals(console_app: FastAPI) -> None:
    described = console_app.openapi()
    operations = {
        (path, method): spec
        for path, methods in described["paths"].items()
        for method, spec in methods.items()
    }
    assert set(operations) == {
        ("/api/v1/dashboard", "get"),
        ("/api/v1/results", "get"),
        ("/api/v1/results/{result_id}", "get"),
        ("/api/v1/results/{result_id}/thumbnail.png", "get"),
        ("/api/v1/series", "get"),
        ("/api/v1/audit", "get"),
        ("/api/v1/audit.csv", "get"),
        ("/api/v1/alerts", "get"),
        ("/api/v1/alerts/{alert_id}", "get"),
        ("/api/v1/alerts/{alert_id}/review", "post"),
    }
    assert {"HTTPBearer", "APIKeyCookie"} <= set(described["components"]["securitySchemes"])
    for spec in operations.values():
        assert "401" in spec["responses"] and spec.get("security")


def test_the_unauthenticated_are_refused_by_every_operation(
    api_schema: schemathesis.schemas.BaseSchema, tmp_path: Path
) -> None:
    for path in OPERATIONS:
        operation = api_schema[path]["GET"]
        case = operation.Case(path_parameters={"result_id": 1, "alert_id": 1})
        answer = case.call()
        assert answer.status_code == 401, operation.label


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_a_review_conforms_to_the_description(
    api_schema: schemathesis.schemas.BaseSchema, mode: GenerationMode
) -> None:
    """Decisions, valid or not, by the test's user (a viewer): described refusals only."""
    operation = api_schema["/api/v1/alerts/{alert_id}/review"]["POST"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})

    check()
