"""The console's JSON API: the pages' data for programs, described by OpenAPI at
``/api/openapi.json``. Every call is authenticated and audited; none changes anything else."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from fastapi.security import APIKeyCookie, HTTPBearer

from console.context import (
    NOT_FOUND,
    SESSION_COOKIE,
    UNAUTHORISED,
    Ctx,
    Db,
    api_user,
    record,
    record_listing,
    record_view,
)
from console.queries import (
    AuditParams,
    ResultParams,
    SeriesParams,
    audit_rows,
    aware,
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
from storage import audit
from storage.models import AuditEvent
from storage.reports import result_detail

# Every column of the audit trail, in the table's order.
AUDIT_CSV_COLUMNS = tuple(column.key for column in AuditEvent.__table__.columns)
bearer = HTTPBearer(auto_error=False, description="token from `medreid users token`")
cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="console login")
router = APIRouter(prefix="/api/v1", dependencies=[Depends(bearer), Depends(cookie)])
ResultId = Annotated[int, PathParam(ge=1, le=2**62)]


def csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return aware(value).isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # a spreadsheet must not read a cell as a formula
    return value


@router.get("/dashboard", response_model=DashboardOut, responses=UNAUTHORISED, tags=["dashboard"])
def api_dashboard(request: Request, ctx: Ctx, db: Db) -> DashboardOut:
    """Counts of today and this week, open alerts, the queue, the models, two series."""
    who = api_user(db, request)
    board = load_dashboard(db, ctx.clock())
    record(db, who, audit.QUERY, page="dashboard")
    return board


@router.get("/results", response_model=ResultPageOut, responses=UNAUTHORISED, tags=["results"])
def api_results(
    request: Request, db: Db, params: Annotated[ResultParams, Query()]
) -> ResultPageOut:
    """Pipeline results, newest first, filtered; ``total`` counts all that match."""
    who = api_user(db, request)
    page = load_results(db, params)
    record_listing(db, who, audit.QUERY, params, "results", len(page.items))
    return page


@router.get(
    "/results/{result_id}",
    response_model=ResultDetailOut,
    responses={**UNAUTHORISED, **NOT_FOUND},
    tags=["results"],
)
def api_result(request: Request, db: Db, result_id: ResultId) -> ResultDetailOut:
    """One result with its header facts, scores, matches, model versions and timings."""
    who = api_user(db, request)
    detail = load_detail(db, result_id)
    if detail is None:
        raise HTTPException(status_code=404, detail="no such result")
    record_view(db, who, detail, "result", result_id)
    return detail


@router.get(
    "/results/{result_id}/thumbnail.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the CLAHE image, 256 px"},
        **UNAUTHORISED,
        404: {"model": ProblemOut, "description": "no such result, or no image to show"},
    },
    tags=["results"],
)
def api_thumbnail(request: Request, ctx: Ctx, db: Db, result_id: ResultId) -> Response:
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


@router.get("/series", response_model=SeriesPageOut, responses=UNAUTHORISED, tags=["results"])
def api_series(request: Request, db: Db, params: Annotated[SeriesParams, Query()]) -> SeriesPageOut:
    """Series verdicts (CT and MR series judged as a whole), newest decision first."""
    who = api_user(db, request)
    page = load_series(db, params)
    record_listing(db, who, audit.QUERY, params, "series", len(page.items))
    return page


@router.get("/audit", response_model=AuditPageOut, responses=UNAUTHORISED, tags=["audit"])
def api_audit(
    request: Request, ctx: Ctx, db: Db, params: Annotated[AuditParams, Query()]
) -> AuditPageOut:
    """Audit events, newest first, with the filters of ``medreid audit``."""
    who = api_user(db, request)
    limit = min(params.limit, ctx.config.export_max_rows)
    events = load_audit(db, params, limit)
    record_listing(db, who, audit.AUDIT_LOG_USED, params, "audit", len(events))
    return AuditPageOut(limit=limit, items=events)


@router.get(
    "/audit.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "UTF-8 CSV"}, **UNAUTHORISED},
    tags=["audit"],
)
def api_audit_csv(
    request: Request, ctx: Ctx, db: Db, params: Annotated[AuditParams, Query()]
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
        writer.writerow([csv_cell(getattr(event, c)) for c in AUDIT_CSV_COLUMNS])
    stamp = ctx.clock().strftime("%Y%m%dT%H%M%SZ")
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="medreid-audit-{stamp}.csv"'},
    )
