"""`medreid users`: the web console's users and API tokens."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from medreid.output import FORMATS, render
from medreid.settings import Settings

if TYPE_CHECKING:  # the commands import their heavy modules when they run
    from storage.models import Clock
log = logging.getLogger("medreid")


ROLES = ("viewer", "reviewer", "admin")  # storage.models.UserRole


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = commands.add_parser("users", help="the web console's users and API tokens")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    for action, text in (
        ("add", "add a user (asks for the password twice)"),
        ("password", "set a new password; ends the user's sessions and tokens"),
    ):
        sub = user_commands.add_parser(action, help=text)
        sub.add_argument("name")
        sub.add_argument(
            "--password-stdin", action="store_true", help="read the password from standard input"
        )
        if action == "add":
            sub.add_argument(
                "--role",
                choices=ROLES,
                default="viewer",
                help="viewer looks; reviewer also confirms or dismisses alerts; admin also "
                "manages users (default: viewer)",
            )
    role = user_commands.add_parser("role", help="set what a user may do")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    user_commands.add_parser("list", help="list users").add_argument(
        "--format", choices=FORMATS, default="table"
    )
    user_commands.add_parser(
        "disable", help="disable a user and end its sessions and tokens"
    ).add_argument("name")
    user_commands.add_parser(
        "unlock", help="end a login lockout of a user name: earlier failures no longer count"
    ).add_argument("name")
    token = user_commands.add_parser(
        "token", help="make an API bearer token for a user (printed once, stored hashed)"
    )
    token.add_argument("name")
    token.add_argument("--days", type=int, help="lifetime (default: console.api_token_days)")


def _read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("medreid: the passwords differ")
    return first


def cmd_users(settings: Settings, args: argparse.Namespace, clock: Clock) -> int:
    from sqlalchemy.exc import IntegrityError

    from console.passwords import (
        WeakPasswordError,
        check_password_policy,
        hash_password,
        new_token,
        token_digest,
    )
    from medreid.app import build_database, os_user
    from storage import audit
    from storage.accounts import add_user, disable_user, find_user, list_users, open_session
    from storage.accounts import set_password as store_password
    from storage.audit_trail import append_audit
    from storage.models import SessionKind

    name: str = getattr(args, "name", "")
    valid_name = 1 <= len(name) <= 64 and name.isprintable() and bool(name.strip())
    if args.users_command != "list" and not valid_name:
        raise SystemExit("medreid: a user name has 1 to 64 printable characters")
    password_hash = None
    if args.users_command in ("add", "password"):
        password = _read_password(args)
        try:
            check_password_policy(password, name)
        except WeakPasswordError as exc:
            raise SystemExit(f"medreid: {exc}") from None
        password_hash = hash_password(password)

    def changed(session: Any, change: str, **detail: Any) -> None:
        append_audit(
            session,
            record=audit.AuditRecord(
                kind=audit.USER_CHANGED,
                actor_user=os_user(),
                actor_host=os.uname().nodename,
                detail={"interface": "cli", "user": name, "change": change, **detail},
                occurred_at=clock(),
            ),
        )

    engine, sessions = build_database(settings)
    try:
        with sessions.begin() as session:
            if args.users_command == "list":
                rows = [
                    {
                        "username": u.username,
                        "role": u.role,
                        "created_at": u.created_at,
                        "created_by": u.created_by,
                        "last_login_at": u.last_login_at,
                        "disabled_at": u.disabled_at,
                    }
                    for u in list_users(session)
                ]
                print(render(rows, args.format, list(rows[0]) if rows else ["username"]))
                return 0
            if args.users_command == "add":
                assert password_hash is not None
                try:
                    with session.begin_nested():
                        added = add_user(
                            session, username=name, password_hash=password_hash, by=os_user()
                        )
                        added.role = args.role
                except IntegrityError:
                    raise SystemExit(f"medreid: user {name!r} exists") from None
                changed(session, "added", role=args.role)
                print(f"user {name} added ({args.role})")
                return 0
            user = find_user(session, username=name)
            if user is None:
                raise SystemExit(f"medreid: no user {name!r}")
            now = clock()
            if args.users_command == "password":
                assert password_hash is not None
                store_password(session, user=user, password_hash=password_hash, now=now)
                changed(session, "password")
                print(f"password of {name} changed; its sessions and tokens are ended")
            elif args.users_command == "disable":
                disable_user(session, user=user, now=now)
                changed(session, "disabled")
                print(f"user {name} disabled; its sessions and tokens are ended")
            elif args.users_command == "role":
                was = user.role
                user.role = args.role
                changed(session, "role", role=args.role, was=was)
                print(f"user {name} is now {args.role} (was {was})")
            elif args.users_command == "unlock":
                user.unlocked_at = now
                changed(session, "unlocked")
                print(f"user {name} unlocked; its earlier failed logins no longer count")
            else:
                if user.disabled_at is not None:
                    raise SystemExit(f"medreid: user {name!r} is disabled")
                days = args.days if args.days is not None else settings.console.api_token_days
                if not 1 <= days <= 3650:
                    raise SystemExit("medreid: --days: from 1 to 3650")
                token = new_token()
                expires = now + dt.timedelta(days=days)
                open_session(
                    session,
                    user=user,
                    kind=SessionKind.API,
                    token_sha256=token_digest(token),
                    csrf_token=None,
                    client_host=None,
                    now=now,
                    expires_at=expires,
                )
                changed(session, "api token", expires_at=expires.isoformat())
                print(token)
                print(
                    f"API token of {name}, valid until {expires:%Y-%m-%d %H:%M} UTC; it is shown "
                    "once. Send it as 'Authorization: Bearer TOKEN'.",
                    file=sys.stderr,
                )
    finally:
        engine.dispose()
    return 0


COMMANDS = {"users": cmd_users}
