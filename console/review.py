"""The review worklist: alerts listed open first, one alert beside the images it was judged
against, and a reviewer's decision (confirmed or dismissed, with a reason). Pages for people,
the same for programs under ``/api/v1/alerts``. Only reviewers and admins decide; every look
and every decision is audited."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from console.api import bearer, cookie
from console.context import (
    UNAUTHORISED,
    Ctx,
    Db,
    Principal,
    Responses,
    api_user,
    html,
    page_user,
    record,
)
from console.pages import pager
from console.queries import Text64, aware
from console.schemas import AlertOut, AlertPageOut, ProblemOut, ReviewIn
from console.thumbnail import ThumbnailError, stored_thumbnail
from storage import audit
from storage.alerts import (
    AlertDecided,
    AlertNotFound,
    AlertQuery,
    AlertReviewError,
    alert_counts,
    list_alerts,
    review_alert,
    review_audit,
)
from storage.audit_trail import append_audit
from storage.models import (
    Alert,
    AlertState,
    GalleryEntry,
    Instance,
    Result,
    SessionKind,
)

pages = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
api = APIRouter(prefix="/api/v1", dependencies=[Depends(bearer), Depends(cookie)], tags=["alerts"])
AlertId = Annotated[int, PathParam(ge=1, le=2**62)]
NO_ALERT: Responses = {404: {"model": ProblemOut, "description": "no such alert"}}


class AlertParams(BaseModel):
    state: Literal["open", "confirmed", "dismissed", "all"] = "open"
    kind: Literal["modality_mismatch", "patient_mismatch"] | None = None
    patient: Text64 = Field(None, description="header or suspected patient ID")
    study: Text64 = Field(None, description="Study Instance UID")
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000_000)


def alert_out(alert: Alert) -> AlertOut:
    values: dict[str, Any] = {c.key: getattr(alert, c.key) for c in Alert.__table__.columns}
    for key, value in values.items():
        if isinstance(value, dt.datetime):
            values[key] = aware(value)
    return AlertOut.model_validate(values)


def load_alerts(db: Session, params: AlertParams) -> AlertPageOut:
    found, total = list_alerts(
        db,
        where=AlertQuery.named(
            params.state,
            params.kind,
            patient=params.patient,
            study=params.study,
            limit=params.limit,
            offset=params.offset,
        ),
    )
    return AlertPageOut(
        total=total,
        offset=params.offset,
        limit=params.limit,
        counts=alert_counts(db),
        items=[alert_out(a) for a in found],
    )


def _seen(db: Session, who: Principal, alert: Alert, page: str) -> None:
    record(
        db,
        who,
        audit.QUERY,
        patient=alert.patient_id,
        study=alert.study_instance_uid,
        page=page,
        alert_id=alert.id,
    )


def decide(
    db: Session,
    who: Principal,
    alert_id: int,
    decision: str,
    reason: str | None,
    now: dt.datetime,
    *,
    enroll: bool = False,
) -> Alert:
    """A reviewer's decision, audited; refusals as HTTP errors (403, 404, 409, 422)."""
    if not who.role.may_review():
        raise HTTPException(403, detail=f"{who.username} is a {who.role}: reviewers decide alerts")
    try:
        alert = review_alert(
            db,
            alert_id=alert_id,
            decision=AlertState(decision),
            reviewer=who.username,
            reason=reason,
            now=now,
            enroll=enroll,
        )
    except AlertNotFound:
        raise HTTPException(404, detail="no such alert") from None
    except AlertDecided as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except AlertReviewError as exc:  # what the decision itself lacks (a reason, an embedding)
        raise HTTPException(422, detail=str(exc)) from None
    for event in review_audit(
        alert,
        actor_user=who.username,
        actor_host=who.client_host,
        interface="api" if who.kind == SessionKind.API else "console",
        enrolled=enroll,
        occurred_at=now,
    ):
        append_audit(db, record=event)
    return alert


def _panel(ctx: Any, instance: Instance | None, caption: str) -> dict[str, str | None]:
    if instance is None:
        return {"image": None, "error": "no stored image", "caption": caption}
    try:
        png = stored_thumbnail(ctx.spool_root, instance.spool_path, ctx.pipeline)
    except ThumbnailError as exc:
        return {"image": None, "error": str(exc), "caption": caption}
    encoded = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"image": encoded, "error": None, "caption": caption}


def comparison(db: Session, ctx: Any, alert: Alert) -> list[dict[str, str | None]]:
    """The flagged image (or the series' first), then the enrolled images of the patient it
    resembles and of its header patient: what the verdict was judged against."""
    if alert.result_id is not None:
        result = db.get(Result, alert.result_id)
        flagged = db.get(Instance, result.instance_id) if result is not None else None
    else:
        flagged = db.scalar(
            select(Instance)
            .where(Instance.series_instance_uid == alert.series_instance_uid)
            .order_by(Instance.id)
            .limit(1)
        )
    panels = [_panel(ctx, flagged, f"flagged: filed under {alert.patient_id}")]
    for patient, who in ((alert.suspected_patient_id, "looks like"), (alert.patient_id, "header")):
        if not patient:
            continue
        enrolled = db.scalars(
            select(Instance)
            .join(GalleryEntry, GalleryEntry.source_instance_id == Instance.id)
            .where(GalleryEntry.patient_id == patient)
            .order_by(GalleryEntry.id.desc())
            .limit(2)
        ).all()
        panels += [_panel(ctx, i, f"{who}: {patient}, enrolled") for i in enrolled]
    return panels


# --------------------------------------------------------------------------- pages


@pages.get("/alerts")
def alerts_page(
    request: Request, ctx: Ctx, db: Db, params: Annotated[AlertParams, Query()]
) -> Response:
    who = page_user(db, request)
    params = params.model_copy(update={"limit": min(params.limit, ctx.config.page_rows)})
    page = load_alerts(db, params)
    record(db, who, audit.QUERY, patient=params.patient, page="alerts", rows=len(page.items))
    older, newer = pager(params, page.total, len(page.items))
    return html(
        request, "alerts.html", user=who, page=page, params=params, older=older, newer=newer
    )


@pages.get("/alerts/{alert_id}")
def alert_page(request: Request, ctx: Ctx, db: Db, alert_id: AlertId) -> Response:
    who = page_user(db, request)
    alert = db.get(Alert, alert_id)
    if alert is None:
        return html(
            request, "error.html", 404, title="Not found", message="No such alert.", user=who
        )
    _seen(db, who, alert, "alert")
    return html(
        request,
        "alert.html",
        user=who,
        a=alert_out(alert),
        panels=comparison(db, ctx, alert),
        may_review=who.role.may_review(),
    )


@pages.post("/alerts/{alert_id}/review")
def review_form(
    request: Request,
    ctx: Ctx,
    db: Db,
    alert_id: AlertId,
    csrf_token: Annotated[str, Form(max_length=256)],
    decision: Annotated[Literal["confirmed", "dismissed"], Form()],
    reason: Annotated[str, Form(max_length=1000)] = "",
    enroll: Annotated[bool, Form()] = False,
) -> Response:
    import hmac

    who = page_user(db, request)
    if not who.csrf_token or not hmac.compare_digest(who.csrf_token, csrf_token):
        return html(
            request, "error.html", 403, title="Forbidden", message="CSRF token mismatch.", user=who
        )
    try:
        decide(db, who, alert_id, decision, reason, ctx.clock(), enroll=enroll)
    except HTTPException as exc:
        titles = {403: "Forbidden", 404: "Not found", 409: "Decided already", 422: "Not saved"}
        return html(
            request,
            "error.html",
            exc.status_code,
            title=titles.get(exc.status_code, "Refused"),
            message=str(exc.detail),
            user=who,
        )
    return RedirectResponse(f"/alerts/{alert_id}", status_code=303)


# --------------------------------------------------------------------------- the JSON API


@api.get("/alerts", response_model=AlertPageOut, responses=UNAUTHORISED)
def api_alerts(request: Request, db: Db, params: Annotated[AlertParams, Query()]) -> AlertPageOut:
    """Alerts, open ones first (``state=all`` for every state), newest first within each."""
    who = api_user(db, request)
    page = load_alerts(db, params)
    record(db, who, audit.QUERY, patient=params.patient, page="alerts", rows=len(page.items))
    return page


@api.get("/alerts/{alert_id}", response_model=AlertOut, responses={**UNAUTHORISED, **NO_ALERT})
def api_alert(request: Request, db: Db, alert_id: AlertId) -> AlertOut:
    """One alert: what was flagged, what the pixels say, and its review."""
    who = api_user(db, request)
    alert = db.get(Alert, alert_id)
    if alert is None:
        raise HTTPException(404, detail="no such alert")
    _seen(db, who, alert, "alert")
    return alert_out(alert)


@api.post(
    "/alerts/{alert_id}/review",
    response_model=AlertOut,
    responses={
        400: {"model": ProblemOut, "description": "a body that is not JSON"},
        **UNAUTHORISED,
        403: {"model": ProblemOut, "description": "not a reviewer, or not a bearer token"},
        **NO_ALERT,
        409: {"model": ProblemOut, "description": "decided already"},
    },
)
def api_review(request: Request, ctx: Ctx, db: Db, alert_id: AlertId, review: ReviewIn) -> AlertOut:
    """Confirm or dismiss an open alert (a dismissal needs a reason). Takes a bearer token:
    a browser session decides on the console's page, behind its CSRF token."""
    who = api_user(db, request)
    if who.kind != SessionKind.API:
        raise HTTPException(403, detail="decisions through the API take a bearer token")
    decided = decide(
        db, who, alert_id, review.decision, review.reason, ctx.clock(), enroll=review.enroll
    )
    return alert_out(decided)
