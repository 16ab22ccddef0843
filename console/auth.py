"""Login and logout: the two forms of the console, each with its CSRF token, and the lockout
after repeated failures."""

from __future__ import annotations

import datetime as dt
import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from console.context import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    ConsoleConfig,
    Ctx,
    Db,
    authenticate,
    client_host,
    html,
    record,
    set_cookie,
)
from console.passwords import DUMMY_HASH, new_token, token_digest, verify_password
from console.queries import aware
from storage import audit
from storage.accounts import end_session, failed_logins, find_user, open_session
from storage.audit_trail import append_audit
from storage.models import ConsoleSession, SessionKind

MAX_USERNAME = 64
router = APIRouter(include_in_schema=False)


def safe_next(value: str | None) -> str:
    """Only a path on this site: never '//host' or 'https://host' (an open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def lockout(
    db: Session,
    config: ConsoleConfig,
    username: str,
    host: str,
    unlocked_at: dt.datetime | None,
    now: dt.datetime,
) -> str | None:
    """Why logins of this name from this address are refused unchecked, if they are."""
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


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request,
    ctx: Ctx,
    next_path: Annotated[str, Query(alias="next", max_length=2048)] = "/",
) -> Response:
    token = new_token()
    response = html(
        request, "login.html", csrf_token=token, next=safe_next(next_path), error=None, user=None
    )
    set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=3600, https=ctx.config.https)
    return response


@router.post("/login")
def login(
    request: Request,
    ctx: Ctx,
    db: Db,
    username: Annotated[str, Form(max_length=MAX_USERNAME)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=256)],
    next_path: Annotated[str, Form(alias="next", max_length=2048)] = "/",
) -> Response:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, csrf_token):
        return html(
            request,
            "error.html",
            403,
            title="Form expired",
            message="The login form expired or came from elsewhere. Open the login page again.",
            user=None,
        )
    now = ctx.clock()
    host = client_host(request) or "unknown"
    user = find_user(db, username=username)
    locked = lockout(db, ctx.config, username, host, user.unlocked_at if user else None, now)
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
            request,
            "login.html",
            401,
            csrf_token=token,
            next=safe_next(next_path),
            error=message,
            user=None,
        )
        set_cookie(refused, LOGIN_CSRF_COOKIE, token, max_age=3600, https=ctx.config.https)
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
    response: Response = RedirectResponse(safe_next(next_path), status_code=303)
    # A session cookie (no Max-Age): gone when the browser closes; the server ends it
    # after session_idle without requests and session_max at the latest.
    set_cookie(response, SESSION_COOKIE, session_token, max_age=None, https=ctx.config.https)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(
    request: Request, ctx: Ctx, db: Db, csrf_token: Annotated[str, Form(max_length=256)]
) -> Response:
    who = authenticate(db, request)
    if who is None:
        return RedirectResponse("/login", status_code=303)
    if not who.csrf_token or not hmac.compare_digest(who.csrf_token, csrf_token):
        return html(
            request, "error.html", 403, title="Forbidden", message="CSRF token mismatch.", user=who
        )
    row = db.get(ConsoleSession, who.session_id)
    if row is not None:
        end_session(db, row=row, why="logout", now=ctx.clock())
    record(db, who, audit.USER_LOGOUT)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
