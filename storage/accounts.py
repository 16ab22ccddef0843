"""Console users and their sessions. Repository functions: the caller owns the transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.audit import USER_AUTHENTICATION, Outcome
from storage.models import AuditEvent, ConsoleSession, ConsoleUser, SessionKind

# A browser session's last_seen_at is written at most this often, not on every request.
LAST_SEEN_RESOLUTION = dt.timedelta(seconds=30)


def add_user(session: Session, *, username: str, password_hash: str, by: str) -> ConsoleUser:
    """Raises IntegrityError (at flush) where the name is taken."""
    user = ConsoleUser(username=username, password_hash=password_hash, created_by=by)
    session.add(user)
    session.flush()
    return user


def find_user(session: Session, *, username: str) -> ConsoleUser | None:
    return session.scalar(select(ConsoleUser).where(ConsoleUser.username == username))


def list_users(session: Session) -> Sequence[ConsoleUser]:
    return session.scalars(select(ConsoleUser).order_by(ConsoleUser.username)).all()


def end_sessions_of(session: Session, *, user_id: int, why: str, now: dt.datetime) -> int:
    ended = session.execute(
        update(ConsoleSession)
        .where(ConsoleSession.user_id == user_id, ConsoleSession.ended_at.is_(None))
        .values(ended_at=now, ended_why=why)
    )
    return int(ended.rowcount or 0)  # type: ignore[attr-defined]


def set_password(
    session: Session, *, user: ConsoleUser, password_hash: str, now: dt.datetime
) -> None:
    """A new password ends every session and token the old one opened."""
    user.password_hash = password_hash
    user.password_changed_at = now
    end_sessions_of(session, user_id=user.id, why="password changed", now=now)
    session.flush()


def disable_user(session: Session, *, user: ConsoleUser, now: dt.datetime) -> None:
    user.disabled_at = now
    end_sessions_of(session, user_id=user.id, why="user disabled", now=now)
    session.flush()


def open_session(
    session: Session,
    *,
    user: ConsoleUser,
    kind: SessionKind,
    token_sha256: str,
    csrf_token: str | None,
    client_host: str | None,
    now: dt.datetime,
    expires_at: dt.datetime,
) -> ConsoleSession:
    row = ConsoleSession(
        token_sha256=token_sha256,
        user_id=user.id,
        kind=kind,
        csrf_token=csrf_token,
        client_host=client_host,
        created_at=now,
        last_seen_at=now,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row


def live_session(
    session: Session, *, token_sha256: str, now: dt.datetime, idle: dt.timedelta
) -> ConsoleSession | None:
    """The session this token opened, if it is still valid now; marks it seen.

    Not valid: unknown, ended (logout, password change, user disabled), past its expiry, its
    user disabled, or, for a browser session, idle for longer than ``idle``."""
    row = session.scalar(select(ConsoleSession).where(ConsoleSession.token_sha256 == token_sha256))
    if row is None or row.ended_at is not None or row.user.disabled_at is not None:
        return None
    why = None
    if _aware(row.expires_at) <= now:
        why = "expired"
    elif row.kind == SessionKind.BROWSER and _aware(row.last_seen_at) + idle <= now:
        why = "idle"
    if why is not None:
        row.ended_at, row.ended_why = now, why
        session.flush()
        return None
    if now - _aware(row.last_seen_at) >= LAST_SEEN_RESOLUTION:
        row.last_seen_at = now
        session.flush()
    return row


def end_session(session: Session, *, row: ConsoleSession, why: str, now: dt.datetime) -> None:
    row.ended_at, row.ended_why = now, why
    session.flush()


def failed_logins(
    session: Session,
    *,
    since: dt.datetime,
    username: str | None = None,
    host: str | None = None,
) -> int:
    """Failed password checks since then, of this user name and/or from this address, counted
    from the audit trail. Logins refused while locked are not counted: a lockout ends when
    its failures age out, however often someone knocks meanwhile."""
    query = (
        select(func.count())
        .select_from(AuditEvent)
        .where(
            AuditEvent.occurred_at >= since,
            AuditEvent.event == USER_AUTHENTICATION.event,
            AuditEvent.event_type == USER_AUTHENTICATION.event_type,
            AuditEvent.outcome != int(Outcome.SUCCESS),
        )
    )
    if username is not None:
        query = query.where(AuditEvent.actor_user == username)
    if host is not None:
        query = query.where(AuditEvent.actor_host == host)
    return int(session.scalar(query) or 0)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
