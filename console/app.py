"""The console's web application: pages for people, the same data as JSON for programs.

``create_app`` assembles the routers (``console.auth``: login and logout; ``console.pages``;
``console.api``; ``console.review``: the alert worklist and its decisions) over what they
share (``console.context``). Every page view, API call, export and decision is an audit event
with the user's name. Pages and API operations are GETs that change nothing, but a
reviewer's decision on an alert; the forms (login, logout, review) carry CSRF tokens.
Nothing here builds SQL from strings, and every page is rendered by Jinja with autoescaping."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.types import ASGIApp, Receive, Scope, Send

from console import api, auth, pages, review
from console.context import ConsoleConfig, ConsoleContext, LoginRequiredError, html, is_api

__all__ = ["ConsoleConfig", "ConsoleContext", "create_app"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
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
            if not is_api(scope["path"]):
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


def create_app(ctx: ConsoleContext) -> FastAPI:
    app = FastAPI(
        title="medreid console API",
        version=ctx.version or "0",
        description=(
            "medreid's results, series verdicts, alerts and audit trail; reviewers confirm or "
            "dismiss alerts. "
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
    app.state.templates = templates
    app.add_middleware(QueryStringEdge)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

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

    @app.exception_handler(LoginRequiredError)
    async def to_login(request: Request, exc: LoginRequiredError) -> Response:
        return RedirectResponse("/login?" + urlencode({"next": exc.next_path}), status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if is_api(request.url.path):
            # the described HTTPValidationError: a list of problems, each with where and why
            return await request_validation_exception_handler(request, exc)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return html(
            request, "error.html", 422, title="Invalid request", message=problems, user=None
        )

    app.include_router(auth.router)
    app.include_router(pages.router)
    app.include_router(review.pages)
    app.include_router(api.router)
    app.include_router(review.api)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
