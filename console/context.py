"""What every route of the console shares: its context from the composition root, one
transaction a request, the signed-in principal, the audit of what was seen, and rendering."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment
from sqlalchemy.orm import Session, sessionmaker

from console.passwords import token_digest
from console.queries import AuditParams, ResultParams, SeriesParams, filters_of
from console.schemas import ProblemOut, ResultDetailOut
from pipeline.runner import PipelineConfig
from storage import audit
from storage.accounts import live_session
from storage.audit_trail import append_audit
from storage.models import Clock, Instance, SessionKind, UserRole, utcnow

SESSION_COOKIE = "medreid_session"
LOGIN_CSRF_COOKIE = "medreid_login_csrf"


@dataclass(frozen=True)
class ConsoleConfig:
    session_idle: dt.timedelta = dt.timedelta(minutes=15)
    session_max: dt.timedelta = dt.timedelta(hours=8)
    page_rows: int = 100
    export_max_rows: int = 100_000
    lockout_failures: int = 5  # of one user name from one address
    lockout_failures_per_address: int = 20  # of any user names from one address
    lockout_window: dt.timedelta = dt.timedelta(minutes=15)
    https: bool = False


@dataclass
class ConsoleContext:
    """What the console needs from the composition root."""

    sessions: sessionmaker[Session]
    spool_root: Path
    pipeline: PipelineConfig
    config: ConsoleConfig = field(default_factory=ConsoleConfig)
    version: str = ""
    clock: Clock = utcnow


@dataclass(frozen=True)
class Principal:
    user_id: int
    username: str
    session_id: int
    kind: str
    csrf_token: str | None
    client_host: str | None
    role: UserRole = UserRole.VIEWER


class LoginRequiredError(Exception):
    """A page was asked for without a valid session: the browser is sent to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def context_of(request: Request) -> ConsoleContext:
    context: ConsoleContext = request.app.state.context
    return context


def transaction(request: Request) -> Iterator[Session]:
    """One transaction a request: its reads, its session bookkeeping and its audit event
    commit together, before the response leaves (scope="function")."""
    with context_of(request).sessions() as db, db.begin():
        try:
            yield db
        except (LoginRequiredError, HTTPException):
            # Refused or not found: what was written (a session ended as idle or expired, the
            # audit of a failed access) stands.
            db.commit()
            raise


Ctx = Annotated[ConsoleContext, Depends(context_of)]
Db = Annotated[Session, Depends(transaction, scope="function")]
Responses = dict[int | str, dict[str, Any]]
UNAUTHORISED: Responses = {401: {"model": ProblemOut, "description": "no valid token or session"}}
NOT_FOUND: Responses = {404: {"model": ProblemOut, "description": "no such result"}}


def is_api(path: str) -> bool:
    return path.startswith("/api/")


def client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def authenticate(db: Session, request: Request) -> Principal | None:
    token = None
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        token = header[7:].strip()
    if not token:
        token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 256:
        return None
    ctx = context_of(request)
    row = live_session(
        db, token_sha256=token_digest(token), now=ctx.clock(), idle=ctx.config.session_idle
    )
    if row is None:
        return None
    return Principal(
        user_id=row.user_id,
        username=row.user.username,
        session_id=row.id,
        kind=row.kind,
        csrf_token=row.csrf_token,
        client_host=client_host(request),
        role=UserRole(row.user.role),
    )


def page_user(db: Session, request: Request) -> Principal:
    who = authenticate(db, request)
    if who is None:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        raise LoginRequiredError(target)
    return who


def api_user(db: Session, request: Request) -> Principal:
    who = authenticate(db, request)
    if who is None:
        raise HTTPException(
            status_code=401,
            detail="authentication required: a bearer token or a console session",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return who


def record(
    db: Session,
    who: Principal,
    kind: audit.EventKind,
    *,
    patient: str | None = None,
    study: str | None = None,
    **detail: Any,
) -> None:
    append_audit(
        db,
        record=audit.AuditRecord(
            kind=kind,
            actor_user=who.username,
            actor_host=who.client_host,
            patient_id=patient,
            study_instance_uid=study,
            detail={"interface": "api" if who.kind == SessionKind.API else "console", **detail},
        ),
    )


def record_listing(
    db: Session,
    who: Principal,
    kind: audit.EventKind,
    params: ResultParams | SeriesParams | AuditParams,
    page: str,
    rows: int,
    **detail: Any,
) -> None:
    """A list looked at: which page, with which filters, how many rows it showed."""
    record(
        db,
        who,
        kind,
        patient=params.patient,
        study=params.study,
        page=page,
        filters=filters_of(params),
        rows=rows,
        **detail,
    )


def record_view(
    db: Session, who: Principal, seen: ResultDetailOut | Instance, page: str, result_id: int
) -> None:
    """One result (or its image) opened: its patient and study are in the record."""
    record(
        db,
        who,
        audit.RESULT_VIEWED,
        patient=seen.patient_id,
        study=seen.study_instance_uid,
        page=page,
        result_id=result_id,
        sop_instance_uid=seen.sop_instance_uid,
    )


def html(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    templates: Environment = request.app.state.templates
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status_code)


def set_cookie(
    response: Response, name: str, value: str, *, max_age: int | None, https: bool
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=https,
    )
