"""The console's pages for people: the dashboard, results, series, one result, the audit
trail. Each is a GET that changes nothing but the audit trail."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any, Protocol
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from console import charts
from console.context import Ctx, Db, html, page_user, record, record_listing, record_view
from console.queries import (
    AuditParams,
    ResultParams,
    SeriesParams,
    detail_of,
    load_audit,
    load_dashboard,
    load_results,
    load_series,
)
from console.schemas import ResultPageOut, SeriesPageOut
from console.thumbnail import ThumbnailError, stored_thumbnail
from storage import audit
from storage.reports import result_detail

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


class Paged(Protocol):
    """A list page's parameters: its filters, and where the page starts."""

    offset: int
    limit: int

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


def pager(params: Paged, total: int, shown: int) -> tuple[str | None, ...]:
    """The query strings of the older and the newer page, where there are such pages."""
    current = {k: v for k, v in params.model_dump(mode="json").items() if v is not None}
    older = newer = None
    if params.offset + shown < total:
        older = urlencode({**current, "offset": params.offset + params.limit})
    if params.offset > 0:
        newer = urlencode({**current, "offset": max(params.offset - params.limit, 0)})
    return older, newer


@router.get("/")
def dashboard_page(request: Request, ctx: Ctx, db: Db) -> Response:
    who = page_user(db, request)
    board = load_dashboard(db, ctx.clock())
    record(db, who, audit.QUERY, page="dashboard")
    return html(
        request,
        "dashboard.html",
        user=who,
        board=board,
        arrivals=charts.arrivals_chart([(h.hour, h.instances) for h in board.arrivals_by_hour]),
        senders=charts.rate_bars(
            [(s.calling_ae, s.results, s.mismatches) for s in board.mismatch_by_sender],
            title="Mismatch verdicts per sender, last 7 days",
        ),
    )


def _listing_page(
    request: Request,
    ctx: Ctx,
    db: Db,
    params: ResultParams | SeriesParams,
    load: Callable[[Session, Any], ResultPageOut | SeriesPageOut],
    page_name: str,
) -> Response:
    """A list page of results or series: at most console.page_rows rows, audited, paged."""
    who = page_user(db, request)
    params = params.model_copy(update={"limit": min(params.limit, ctx.config.page_rows)})
    page = load(db, params)
    record_listing(db, who, audit.QUERY, params, page_name, len(page.items))
    older, newer = pager(params, page.total, len(page.items))
    return html(
        request, f"{page_name}.html", user=who, page=page, params=params, older=older, newer=newer
    )


@router.get("/results")
def results_page(
    request: Request, ctx: Ctx, db: Db, params: Annotated[ResultParams, Query()]
) -> Response:
    return _listing_page(request, ctx, db, params, load_results, "results")


@router.get("/series")
def series_page(
    request: Request, ctx: Ctx, db: Db, params: Annotated[SeriesParams, Query()]
) -> Response:
    return _listing_page(request, ctx, db, params, load_series, "series")


@router.get("/results/{result_id}")
def result_page(
    request: Request, ctx: Ctx, db: Db, result_id: Annotated[int, PathParam(ge=1, le=2**62)]
) -> Response:
    who = page_user(db, request)
    found = result_detail(db, result_id=result_id)
    if found is None:
        return html(
            request, "error.html", 404, title="Not found", message="No such result.", user=who
        )
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
        request,
        "result.html",
        user=who,
        r=detail,
        thumbnail=thumbnail,
        thumbnail_error=thumbnail_error,
        modality_chart=charts.score_bars(scores, title="COMPA probabilities") if scores else None,
        match_chart=charts.score_bars(
            [(m.patient_id, m.score) for m in detail.top_matches],
            title="Gallery similarity of the best matches",
            marker=detail.identity_threshold,
        )
        if detail.top_matches
        else None,
    )


@router.get("/audit")
def audit_page(
    request: Request, ctx: Ctx, db: Db, params: Annotated[AuditParams, Query()]
) -> Response:
    who = page_user(db, request)
    limit = min(params.limit, ctx.config.page_rows * 5)
    events = load_audit(db, params, limit)
    record_listing(db, who, audit.AUDIT_LOG_USED, params, "audit", len(events))
    query = urlencode({k: v for k, v in params.model_dump(mode="json").items() if v})
    return html(request, "audit.html", user=who, events=events, params=params, export_query=query)
