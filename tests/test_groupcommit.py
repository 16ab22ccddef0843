"""Group commit on SQLite and PostgreSQL: threads' writes share transactions, errors do not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from storage.db import snapshot
from storage.groupcommit import CommitOutcomeUnknown, GroupCommit
from storage.instances import NewInstance, record_instance
from storage.models import Instance
from tests.conftest import Database
from tests.test_storage import new_instance

pytestmark = pytest.mark.db


def count_commits(database: Database) -> list[int]:
    commits: list[int] = []
    event.listen(database.engine, "commit", lambda _connection: commits.append(1))
    return commits


def recorded(database: Database) -> int:
    # a snapshot: it need not wait for a writer's lock
    with snapshot(database.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_a_lone_write_commits_alone(database: Database) -> None:
    commits = count_commits(database)
    group: GroupCommit[NewInstance, int] = GroupCommit(
        database.sessions,
        lambda session, new: record_instance(session, new=new, version=1, spool_path="x"),
    )
    first = group.submit(new_instance("1.2.3.1"))
    second = group.submit(new_instance("1.2.3.2"))
    assert first != second
    assert len(commits) == 2
    assert recorded(database) == 2


def record(session: Session, new: NewInstance) -> int:
    return record_instance(session, new=new, version=1, spool_path=new.sop_instance_uid)


def held_batch(
    database: Database,
    items: list[NewInstance],
    then: Callable[[Session, NewInstance], int] = record,
    ready: dict[str, Future[None]] | None = None,
) -> tuple[list[int | BaseException | None], int]:
    """The first item's transaction is held open until all the others are queued, so they
    are written together by ``then``; each item's outcome and the number of commits. Items
    whose UIDs ``ready`` names are submitted with those futures."""
    commits = count_commits(database)
    writing, go = threading.Event(), threading.Event()

    def write(session: Session, new: NewInstance) -> int:
        if new is items[0]:
            writing.set()
            go.wait(10)
            return record(session, new)
        return then(session, new)

    group: GroupCommit[NewInstance, int] = GroupCommit(database.sessions, write)
    outcomes: list[int | BaseException | None] = [None] * len(items)

    def submit(index: int) -> None:
        item = items[index]
        try:
            outcomes[index] = group.submit(item, ready=(ready or {}).get(item.sop_instance_uid))
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(items))]
    threads[0].start()
    assert writing.wait(10)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 10
    while group.queued < len(items) - 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    go.set()
    for thread in threads:
        thread.join(10)
    return outcomes, len(commits)


def test_writes_queued_meanwhile_share_one_commit(database: Database) -> None:
    items = [new_instance(f"1.2.3.{n}", sha=f"{n:064x}") for n in range(8)]
    outcomes, commits = held_batch(database, items)
    assert all(isinstance(outcome, int) for outcome in outcomes)
    assert len(set(outcomes)) == 8
    # the held one alone, then the seven queued behind it together
    assert commits == 2
    assert recorded(database) == 8
    with database.sessions() as session:
        paths = {i: p for i, p in session.execute(select(Instance.id, Instance.spool_path))}
    ids = [outcome for outcome in outcomes if isinstance(outcome, int)]
    assert [paths[instance_id] for instance_id in ids] == [i.sop_instance_uid for i in items]


def test_one_items_error_is_its_own(database: Database) -> None:
    with database.sessions.begin() as session:
        record_instance(session, new=new_instance("1.2.3.5"), version=1, spool_path="old")
    # the fourth repeats a stored UID and version: only it fails
    items = [new_instance(f"1.2.3.{n}", sha=f"{n:064x}") for n in (1, 2, 3, 5, 6)]
    outcomes, _commits = held_batch(database, items)
    assert isinstance(outcomes[3], IntegrityError)
    assert all(isinstance(outcomes[i], int) for i in (0, 1, 2, 4))
    assert recorded(database) == 5


def test_a_database_failure_answers_the_whole_batch_at_once(database: Database) -> None:
    attempts: list[str] = []

    def database_away(session: Session, new: NewInstance) -> int:
        attempts.append(new.sop_instance_uid)
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    items = [new_instance(f"1.2.3.{n}", sha=f"{n:064x}") for n in range(5)]
    outcomes, _commits = held_batch(database, items, then=database_away)
    assert isinstance(outcomes[0], int)
    assert all(isinstance(outcome, OperationalError) for outcome in outcomes[1:])
    # one attempt for the batch of four, none again one by one
    assert attempts == ["1.2.3.1"]
    assert recorded(database) == 1


def test_a_failed_commit_is_told_apart_from_an_error_before_it(database: Database) -> None:
    commits: list[int] = []

    def second_commit_fails(_connection: object) -> None:
        commits.append(1)
        if len(commits) == 2:
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    event.listen(database.engine, "commit", second_commit_fails)
    try:
        items = [new_instance(f"1.2.3.{n}", sha=f"{n:064x}") for n in range(4)]
        outcomes, _commits = held_batch(database, items)
    finally:
        event.remove(database.engine, "commit", second_commit_fails)
    # the held one commits; the batch behind it fails in its commit, all of it, at once
    assert isinstance(outcomes[0], int)
    assert all(isinstance(outcome, CommitOutcomeUnknown) for outcome in outcomes[1:])
    assert len(commits) == 2
    assert recorded(database) == 1

    def refused(session: Session, new: NewInstance) -> int:
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    # an error before the commit is raised as it is: nothing was committed
    with pytest.raises(OperationalError):
        GroupCommit(database.sessions, refused).submit(new_instance("1.2.3.9"))
    # and the connection whose commit failed was not handed to the next writer
    assert isinstance(GroupCommit(database.sessions, record).submit(new_instance("1.2.3.8")), int)
    assert recorded(database) == 2


def test_a_row_is_written_while_its_future_runs_and_committed_only_after_it(
    database: Database,
) -> None:
    written = threading.Event()

    def write_then(session: Session, new: NewInstance) -> int:
        instance_id = record(session, new)
        written.set()
        return instance_id

    group: GroupCommit[NewInstance, int] = GroupCommit(database.sessions, write_then)
    ready: Future[None] = Future()
    outcome: list[int] = []
    submitter = threading.Thread(
        target=lambda: outcome.append(group.submit(new_instance("1.2.3.1"), ready=ready))
    )
    submitter.start()
    try:
        assert written.wait(10)  # the row is written before the future is done...
        time.sleep(0.05)
        assert recorded(database) == 0  # ...and not committed
        assert submitter.is_alive()
    finally:
        ready.set_result(None)
        submitter.join(10)
    assert len(outcome) == 1 and recorded(database) == 1


def test_a_failed_future_fails_its_item_alone(database: Database) -> None:
    failed: Future[None] = Future()
    failed.set_exception(OSError(5, "Input/output error"))
    items = [new_instance(f"1.2.3.{n}", sha=f"{n:064x}") for n in range(4)]
    outcomes, commits = held_batch(database, items, ready={"1.2.3.2": failed})
    # the batch of three failed for one future, and was written again one item at a time
    assert isinstance(outcomes[2], OSError)
    assert all(isinstance(outcomes[i], int) for i in (0, 1, 3))
    assert recorded(database) == 3
    assert commits == 3


def test_submit_returns_only_once_its_future_is_done_even_when_the_write_fails(
    database: Database,
) -> None:
    def refused(session: Session, new: NewInstance) -> int:
        raise IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed"))

    ready: Future[None] = Future()
    timer = threading.Timer(0.2, ready.set_result, args=(None,))
    timer.start()
    started = time.monotonic()
    with pytest.raises(IntegrityError):
        GroupCommit(database.sessions, refused).submit(new_instance("1.2.3.1"), ready=ready)
    assert ready.done() and time.monotonic() - started >= 0.15
    timer.join()
