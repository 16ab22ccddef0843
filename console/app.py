"""The console's web application: pages for people, the same data as JSON for programs.

Every page view, API call and export is an audit event with the user's name. Every page and
API operation is a GET that changes nothing; the two forms (login, logout) carry CSRF tokens.
Nothing here builds SQL from strings, and every page is rendered by Jinja with autoescaping."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hmac
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPBearer
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from console import charts
from console.passwords import DUMMY_HASH, new_token, token_digest, verify_password
from console.queries import (
    AuditParams,
    ResultParams,
    SeriesParams,
    audit_rows,
    aware,
    detail_of,
    filters_of,
    load_audit,
    load_dashboard,
    load_detail,
    load_results,
    load_series,
)
from console.schemas import (
    AuditPageOut,
    DashboardOut,
    ProblemOut,
    ResultDetailOut,
    ResultPageOut,
    SeriesPageOut,
)
from console.thumbnail import ThumbnailError, stored_thumbnail
from pipeline.runner import PipelineConfig
from storage import audit
from storage.accounts import (
    end_session,
    failed_logins,
    find_user,
    live_session,
    open_session,
)
from storage.audit_trail import append_audit
from storage.models import (
    AuditEvent,
    Clock,
    ConsoleSession,
    Instance,
    SessionKind,
    utcnow,
)
from storage.reports import (
    result_detail,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "medreid_session"
LOGIN_CSRF_COOKIE = "medreid_login_csrf"
MAX_USERNAME = 64
# Every column of the audit trail, in the table's order.
AUDIT_CSV_COLUMNS = tuple(column.key for column in AuditEvent.__table__.columns)
SECURITY_HEADERS = {
    # No script at all; styles and images from here (thumbnails inline as data: URIs).
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Pages hold patient data: no copies in shared or browser caches.
    "Cache-Control": "no-store",
}


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


class LoginRequiredError(Exception):
    """A page was asked for without a valid session: the browser is sent to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class QueryStringEdge:
    """What a query string may be, before validation.

    Pages: an HTML form sends each filter left blank as ``name=``, meaning "any"; those are
    dropped. API: each parameter is one value, as described; a parameter given twice is
    refused (422), where the framework would silently take the last."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            if not _is_api(scope["path"]):
                kept = urlencode([(k, v) for k, v in pairs if v.strip()])
                scope["query_string"] = kept.encode("ascii")  # in place: the log reads the route
            else:
                names = [name for name, _ in pairs]
                repeated = sorted({name for name in names if names.count(name) > 1})
                if repeated:
                    problems = [
                        {"type": "repeated", "loc": ["query", name], "msg": "given more than once"}
                        for name in repeated
                    ]
                    await JSONResponse({"detail": problems}, status_code=422)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _is_api(path: str) -> bool:
    return path.startswith("/api/")


def _safe_next(value: str | None) -> str:
    """Only a path on this site: never '//host' or 'https://host' (an open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _pager(params: ResultParams | SeriesParams, total: int, shown: int) -> tuple[str | None, ...]:
    """The query strings of the older and the newer page, where there are such pages."""
    current = {k: v for k, v in params.model_dump(mode="json").items() if v is not None}
    older = newer = None
    if params.offset + shown < total:
        older = urlencode({**current, "offset": params.offset + params.limit})
    if params.offset > 0:
        newer = urlencode({**current, "offset": max(params.offset - params.limit, 0)})
    return older, newer


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return aware(value).isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # a spreadsheet must not read a cell as a formula
    return value


# --------------------------------------------------------------------------- the application


def transaction(request: Request) -> Iterator[Session]:
    """One transaction a request: its reads, its session bookkeeping and its audit event
    commit together, before the response leaves (scope="function")."""
    context: ConsoleContext = request.app.state.context
    with context.sessions() as db, db.begin():
        try:
            yield db
        except (LoginRequiredError, HTTPException):
            # Refused or not found: what was written (a session ended as idle or expired, the
            # audit of a failed access) stands.
            db.commit()
            raise


Db = Annotated[Session, Depends(transaction, scope="function")]
Responses = dict[int | str, dict[str, Any]]


def create_app(ctx: ConsoleContext) -> FastAPI:
    app = FastAPI(
        title="medreid console API",
        version=ctx.version or "0",
        description=(
            "Read-only access to medreid's results, series verdicts and audit trail. "
            "Authenticate with a bearer token from `medreid users token NAME`, or with the "
            "session cookie of a console login. Every call is recorded in the audit trail."
        ),
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    templates.globals["version"] = ctx.version
    app.state.context = ctx
    app.add_middleware(QueryStringEdge)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    bearer = HTTPBearer(auto_error=False, description="token from `medreid users token`")
    cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="console login")

    # ------------------------------------------------------------------ plumbing

    @app.middleware("http")
    async def headers_and_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if ctx.config.https:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        # The route's template, never the query string or the concrete path: filters carry
        # patient IDs, and the log is no place for them.
        route = request.scope.get("route")
        shown = getattr(route, "path", "(no route)")
        log.info(
            "%s %s -> %d in %.1f ms",
            request.method,
            shown,
            response.status_code,
            (time.perf_counter() - started) * 1000.0,
        )
        return response

    def client_host(request: Request) -> str | None:
        return request.client.host if request.client else None

    def lockout(
        db: Session,
        username: str,
        host: str,
        unlocked_at: dt.datetime | None,
        now: dt.datetime,
    ) -> str | None:
        """Why logins of this name from this address are refused unchecked, if they are."""
        config = ctx.config
        since = now - config.lockout_window
        since_unlock = max(since, aware(unlocked_at)) if unlocked_at is not None else since
        if (
            failed_logins(db, since=since_unlock, username=username, host=host)
            >= config.lockout_failures
        ):
            return "locked: repeated failures of this user name from this address"
        if failed_logins(db, since=since, host=host) >= config.lockout_failures_per_address:
            return "locked: repeated failures from this address"
        return None

    def authenticate(db: Session, request: Request) -> Principal | None:
        token = None
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        if not token:
            token = request.cookies.get(SESSION_COOKIE)
        if not token or len(token) > 256:
            return None
        now = ctx.clock()
        row = live_session(
            db, token_sha256=token_digest(token), now=now, idle=ctx.config.session_idle
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
        )

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

    @app.exception_handler(LoginRequiredError)
    async def to_login(request: Request, exc: LoginRequiredError) -> Response:
        return RedirectResponse("/login?" + urlencode({"next": exc.next_path}), status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if _is_api(request.url.path):
            # the described HTTPValidationError: a list of problems, each with where and why
            return await request_validation_exception_handler(request, exc)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return HTMLResponse(
            templates.get_template("error.html").render(
                title="Invalid request", message=problems, user=None
            ),
            status_code=422,
        )

    def html(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status_code)

    auth_schemes = [Depends(bearer), Depends(cookie)]
    unauthorised: Responses = {
        401: {"model": ProblemOut, "description": "no valid token or session"}
    }
    not_found: Responses = {404: {"model": ProblemOut, "description": "no such result"}}

    # ------------------------------------------------------------------ login and logout

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(
        request: Request, next_path: Annotated[str, Query(alias="next", max_length=2048)] = "/"
    ) -> Response:
        token = new_token()
        response = html(
            "login.html", csrf_token=token, next=_safe_next(next_path), error=None, user=None
        )
        _set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=3600, https=ctx.config.https)
        return response

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        db: Db,
        username: Annotated[str, Form(max_length=MAX_USERNAME)],
        password: Annotated[str, Form(max_length=1024)],
        csrf_token: Annotated[str, Form(max_length=256)],
        next_path: Annotated[str, Form(alias="next", max_length=2048)] = "/",
    ) -> Response:
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected or not hmac.compare_digest(expected, csrf_token):
            return html(
                "error.html",
                403,
                title="Form expired",
                message="The login form expired or came from elsewhere. Open the login page again.",
                user=None,
            )
        now = ctx.clock()
        host = client_host(request) or "unknown"
        user = find_user(db, username=username)
        locked = lockout(db, username, host, user.unlocked_at if user else None, now)
        # A wrong name costs a hash check too, so timing does not tell which names exist.
        valid = verify_password(password, user.password_hash if user else DUMMY_HASH)
        reason = None
        if locked:
            reason = locked
        elif user is None or not valid:
            reason = "unknown user or wrong password"
        elif user.disabled_at is not None:
            reason = "user disabled"
        if reason is not None or user is None:
            append_audit(
                db,
                record=audit.AuditRecord(
                    kind=audit.LOGIN_LOCKED if locked else audit.USER_AUTHENTICATION,
                    occurred_at=now,
                    outcome=audit.Outcome.MINOR_FAILURE,
                    actor_user=username,
                    actor_host=host,
                    detail={"interface": "console", "reason": reason},
                ),
            )
            token = new_token()
            message = (
                "Too many failed logins: logins from here are refused for up to "
                f"{int(ctx.config.lockout_window.total_seconds() // 60)} minutes."
                if locked
                else "Unknown user name or wrong password."
            )
            refused = html(
                "login.html",
                401,
                csrf_token=token,
                next=_safe_next(next_path),
                error=message,
                user=None,
            )
            _set_cookie(refused, LOGIN_CSRF_COOKIE, token, max_age=3600, https=ctx.config.https)
            return refused
        session_token = new_token()
        open_session(
            db,
            user=user,
            kind=SessionKind.BROWSER,
            token_sha256=token_digest(session_token),
            csrf_token=new_token(),
            client_host=host,
            now=now,
            expires_at=now + ctx.config.session_max,
        )
        user.last_login_at = now
        append_audit(
            db,
            record=audit.AuditRecord(
                kind=audit.USER_AUTHENTICATION,
                occurred_at=now,
                actor_user=user.username,
                actor_host=host,
                detail={"interface": "console"},
            ),
        )
        response: Response = RedirectResponse(_safe_next(next_path), status_code=303)
        # A session cookie (no Max-Age): gone when the browser closes; the server ends it
        # after session_idle without requests and session_max at the latest.
        _set_cookie(response, SESSION_COOKIE, session_token, max_age=None, https=ctx.config.https)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(
        request: Request, db: Db, csrf_token: Annotated[str, Form(max_length=256)]
    ) -> Response:
        who = authenticate(db, request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        if not who.csrf_token or not hmac.compare_digest(who.csrf_token, csrf_token):
            return html(
                "error.html", 403, title="Forbidden", message="CSRF token mismatch.", user=who
            )
        row = db.get(ConsoleSession, who.session_id)
        if row is not None:
            end_session(db, row=row, why="logout", now=ctx.clock())
        record(db, who, audit.USER_LOGOUT)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------------ pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_page(request: Request, db: Db) -> Response:
        who = page_user(db, request)
        board = load_dashboard(db, ctx.clock())
        record(db, who, audit.QUERY, page="dashboard")
        return html(
            "dashboard.html",
            user=who,
            board=board,
            arrivals=charts.arrivals_chart([(h.hour, h.instances) for h in board.arrivals_by_hour]),
            senders=charts.rate_bars(
                [(s.calling_ae, s.results, s.mismatches) for s in board.mismatch_by_sender],
                title="Mismatch verdicts per sender, last 7 days",
            ),
        )

    @app.get("/results", response_class=HTMLResponse, include_in_schema=False)
    def results_page(
        request: Request, db: Db, params: Annotated[ResultParams, Query()]
    ) -> Response:
        who = page_user(db, request)
        params = params.model_copy(update={"limit": min(params.limit, ctx.config.page_rows)})
        page = load_results(db, params)
        record_listing(db, who, audit.QUERY, params, "results", len(page.items))
        older, newer = _pager(params, page.total, len(page.items))
        return html("results.html", user=who, page=page, params=params, older=older, newer=newer)

    @app.get("/series", response_class=HTMLResponse, include_in_schema=False)
    def series_page(request: Request, db: Db, params: Annotated[SeriesParams, Query()]) -> Response:
        who = page_user(db, request)
        params = params.model_copy(update={"limit": min(params.limit, ctx.config.page_rows)})
        page = load_series(db, params)
        record_listing(db, who, audit.QUERY, params, "series", len(page.items))
        older, newer = _pager(params, page.total, len(page.items))
        return html("series.html", user=who, page=page, params=params, older=older, newer=newer)

    @app.get("/results/{result_id}", response_class=HTMLResponse, include_in_schema=False)
    def result_page(
        request: Request, db: Db, result_id: Annotated[int, PathParam(ge=1, le=2**62)]
    ) -> Response:
        who = page_user(db, request)
        found = result_detail(db, result_id=result_id)
        if found is None:
            return html("error.html", 404, title="Not found", message="No such result.", user=who)
        detail = detail_of(db, *found)
        record_view(db, who, detail, "result", result_id)
        thumbnail = thumbnail_error = None
        try:
            png = stored_thumbnail(ctx.spool_root, found[1].spool_path, ctx.pipeline)
            thumbnail = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        except ThumbnailError as exc:
            thumbnail_error = str(exc)
        scores = sorted((detail.modality_scores or {}).items(), key=lambda kv: -kv[1])
        return html(
            "result.html",
            user=who,
            r=detail,
            thumbnail=thumbnail,
            thumbnail_error=thumbnail_error,
            modality_chart=charts.score_bars(scores, title="COMPA probabilities")
            if scores
            else None,
            match_chart=charts.score_bars(
                [(m.patient_id, m.score) for m in detail.top_matches],
                title="Gallery similarity of the best matches",
                marker=detail.identity_threshold,
            )
            if detail.top_matches
            else None,
        )

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, db: Db, params: Annotated[AuditParams, Query()]) -> Response:
        who = page_user(db, request)
        limit = min(params.limit, ctx.config.page_rows * 5)
        events = load_audit(db, params, limit)
        record_listing(db, who, audit.AUDIT_LOG_USED, params, "audit", len(events))
        query = urlencode({k: v for k, v in params.model_dump(mode="json").items() if v})
        return html("audit.html", user=who, events=events, params=params, export_query=query)

    # ------------------------------------------------------------------ the JSON API

    @app.get(
        "/api/v1/dashboard",
        response_model=DashboardOut,
        dependencies=auth_schemes,
        responses=unauthorised,
        tags=["dashboard"],
    )
    def api_dashboard(request: Request, db: Db) -> DashboardOut:
        """Counts of today and this week, open alerts, the queue, the models, two series."""
        who = api_user(db, request)
        board = load_dashboard(db, ctx.clock())
        record(db, who, audit.QUERY, page="dashboard")
        return board

    @app.get(
        "/api/v1/results",
        response_model=ResultPageOut,
        dependencies=auth_schemes,
        responses=unauthorised,
        tags=["results"],
    )
    def api_results(
        request: Request, db: Db, params: Annotated[ResultParams, Query()]
    ) -> ResultPageOut:
        """Pipeline results, newest first, filtered; ``total`` counts all that match."""
        who = api_user(db, request)
        page = load_results(db, params)
        record_listing(db, who, audit.QUERY, params, "results", len(page.items))
        return page

    @app.get(
        "/api/v1/results/{result_id}",
        response_model=ResultDetailOut,
        dependencies=auth_schemes,
        responses={**unauthorised, **not_found},
        tags=["results"],
    )
    def api_result(
        request: Request, db: Db, result_id: Annotated[int, PathParam(ge=1, le=2**62)]
    ) -> ResultDetailOut:
        """One result with its header facts, scores, matches, model versions and timings."""
        who = api_user(db, request)
        detail = load_detail(db, result_id)
        if detail is None:
            raise HTTPException(status_code=404, detail="no such result")
        record_view(db, who, detail, "result", result_id)
        return detail

    @app.get(
        "/api/v1/results/{result_id}/thumbnail.png",
        response_class=Response,
        dependencies=auth_schemes,
        responses={
            200: {"content": {"image/png": {}}, "description": "the CLAHE image, 256 px"},
            **unauthorised,
            404: {"model": ProblemOut, "description": "no such result, or no image to show"},
        },
        tags=["results"],
    )
    def api_thumbnail(
        request: Request, db: Db, result_id: Annotated[int, PathParam(ge=1, le=2**62)]
    ) -> Response:
        """The CLAHE-enhanced image of the result's instance, its longer side 256 pixels."""
        who = api_user(db, request)
        found = result_detail(db, result_id=result_id)
        if found is None:
            raise HTTPException(status_code=404, detail="no such result")
        result, instance = found
        record_view(db, who, instance, "thumbnail", result.id)
        try:
            png = stored_thumbnail(ctx.spool_root, instance.spool_path, ctx.pipeline)
        except ThumbnailError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return Response(png, media_type="image/png")

    @app.get(
        "/api/v1/series",
        response_model=SeriesPageOut,
        dependencies=auth_schemes,
        responses=unauthorised,
        tags=["results"],
    )
    def api_series(
        request: Request, db: Db, params: Annotated[SeriesParams, Query()]
    ) -> SeriesPageOut:
        """Series verdicts (CT and MR series judged as a whole), newest decision first."""
        who = api_user(db, request)
        page = load_series(db, params)
        record_listing(db, who, audit.QUERY, params, "series", len(page.items))
        return page

    @app.get(
        "/api/v1/audit",
        response_model=AuditPageOut,
        dependencies=auth_schemes,
        responses=unauthorised,
        tags=["audit"],
    )
    def api_audit(
        request: Request, db: Db, params: Annotated[AuditParams, Query()]
    ) -> AuditPageOut:
        """Audit events, newest first, with the filters of ``medreid audit``."""
        who = api_user(db, request)
        limit = min(params.limit, ctx.config.export_max_rows)
        events = load_audit(db, params, limit)
        record_listing(db, who, audit.AUDIT_LOG_USED, params, "audit", len(events))
        return AuditPageOut(limit=limit, items=events)

    @app.get(
        "/api/v1/audit.csv",
        response_class=Response,
        dependencies=auth_schemes,
        responses={200: {"content": {"text/csv": {}}, "description": "UTF-8 CSV"}, **unauthorised},
        tags=["audit"],
    )
    def api_audit_csv(
        request: Request, db: Db, params: Annotated[AuditParams, Query()]
    ) -> Response:
        """The same events as CSV, up to console.export_max_rows rows; the export is audited."""
        who = api_user(db, request)
        limit = min(max(params.limit, ctx.config.page_rows), ctx.config.export_max_rows)
        events = audit_rows(db, params, limit)  # rows straight to CSV, no models
        record_listing(db, who, audit.AUDIT_LOG_USED, params, "audit", len(events), export="csv")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(AUDIT_CSV_COLUMNS)
        for event in events:
            writer.writerow([_csv_cell(getattr(event, c)) for c in AUDIT_CSV_COLUMNS])
        stamp = ctx.clock().strftime("%Y%m%dT%H%M%SZ")
        return Response(
            buffer.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="medreid-audit-{stamp}.csv"'},
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _set_cookie(
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
