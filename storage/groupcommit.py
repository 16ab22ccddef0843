"""Group commit: the writes of many threads in one transaction, one fsync for all of them.

Each receiving association must see its instance committed before it answers Success. When
several associations store at once, the first thread to find the database free commits
everything queued by then in one transaction; the others wait for that commit instead of
queueing on the database's write lock (SQLite's busy handler sleeps in steps of milliseconds)
and paying a log fsync each. A thread alone commits alone, with no wait added.

An item may come with a future that must be done before its row may be committed (its
file's fsync, say): the rows are written while it runs, and the commit waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class CommitOutcomeUnknown(Exception):
    """The database failed during the commit itself: the items may or may not be recorded.

    Any other error a submitter sees was raised before the commit, and rolled back."""


@dataclass(eq=False)
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    ready: Future[Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: ResultT | None = None
    error: BaseException | None = None
    settled: bool = False

    def settle(self, result: ResultT | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.settled = result, error, True


class GroupCommit(Generic[ItemT, ResultT]):
    """``submit(item)`` runs ``write(session, item)`` in a committed transaction shared with
    the items other threads submitted meanwhile, and returns its result or raises its error.

    If the shared transaction fails for one item (a duplicate key, say), each item is written
    again in a transaction of its own, so that error is that item's alone; if the database
    itself fails (away, or locked past its timeout), every item of the batch gets that error.
    A failure of the commit itself is raised as :class:`CommitOutcomeUnknown`."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        write: Callable[[Session, ItemT], ResultT],
        *,
        max_batch: int = 64,
    ) -> None:
        self._sessions = sessions
        self._write = write
        self._max_batch = max_batch
        self._queue: list[_Pending[ItemT, ResultT]] = []
        self._queue_lock = threading.Lock()
        # Held by the thread committing; the others queue behind it.
        self._commit_lock = threading.Lock()

    @property
    def queued(self) -> int:
        """Items waiting for a commit."""
        with self._queue_lock:
            return len(self._queue)

    def submit(self, item: ItemT, *, ready: Future[Any] | None = None) -> ResultT:
        """Commit ``item``; with ``ready``, not before that is done, and its error is the
        item's. Returns or raises only once ``ready`` is done, whatever happened."""
        pending: _Pending[ItemT, ResultT] = _Pending(item, ready)
        try:
            return self._submit(pending)
        finally:
            if ready is not None:
                wait_for([ready])

    def _submit(self, pending: _Pending[ItemT, ResultT]) -> ResultT:
        with self._queue_lock:
            self._queue.append(pending)
        while not pending.done.is_set():
            with self._commit_lock:
                if pending.done.is_set():
                    break  # a committer took it while this thread waited for the lock
                with self._queue_lock:
                    batch = self._queue[: self._max_batch]
                    del self._queue[: self._max_batch]
                self._commit(batch)
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    def _commit(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        try:
            if len(batch) > 1:
                try:
                    results = self._transaction(batch)
                except (OperationalError, InterfaceError, CommitOutcomeUnknown) as exc:
                    # The database is away or locked past its timeout: the same answer for
                    # all, now, rather than each item waiting out the timeout in turn.
                    for pending in batch:
                        pending.settle(error=exc)
                except Exception:
                    pass  # one item's fault, a duplicate key say: each is written alone below
                else:
                    for pending, result in zip(batch, results, strict=True):
                        pending.settle(result)
            for pending in batch:
                if not pending.settled:
                    self._write_alone(pending)
        except BaseException as exc:
            # interrupted: whoever waits on this batch learns why rather than hanging
            for pending in batch:
                if not pending.settled:
                    pending.settle(error=exc)
            raise
        finally:
            for pending in batch:
                pending.done.set()

    def _write_alone(self, pending: _Pending[ItemT, ResultT]) -> None:
        try:
            (result,) = self._transaction([pending])
        except Exception as exc:
            pending.settle(error=exc)
        else:
            pending.settle(result)

    def _transaction(self, batch: list[_Pending[ItemT, ResultT]]) -> list[ResultT]:
        """Write the items in one transaction and commit it once their futures are done. An
        error before the commit (a future's included) rolls it back and is raised as it is."""
        with self._sessions() as session:
            session.begin()
            results = [self._write(session, pending.item) for pending in batch]
            session.flush()
            for pending in batch:
                if pending.ready is not None:
                    pending.ready.result()
            connection = session.connection()
            try:
                session.commit()
            except Exception as exc:
                # A connection whose commit failed may still hold its transaction (SQLite
                # keeps it open): closed, not put back in the pool for the next writer.
                try:
                    connection.invalidate()
                except Exception:
                    log.warning("could not close a connection whose commit failed", exc_info=True)
                raise CommitOutcomeUnknown(f"the commit failed: {exc}") from exc
        return results
