"""Group commit: concurrent writes of one kind applied by one database call.

A call to an idle writer is sent at once (a batch of one: nothing waits for
company). Calls that arrive while batches are in flight queue; a finishing
batch sends the whole queue (as far as keys allow), and once ``min_batch``
calls are queued another batch may start beside those in flight (up to
``max_in_flight``, so PostgreSQL works on several at once) — each as one call
of a batch function (``apply_reactions``, ``apply_token_operations``):
one round trip and one commit for many writes, which is what lets a viral
entry or a hot merchant take writes at the database's pace rather than the
pace of per-call overheads.

A batch function takes one array per argument (item i is the i-th element of
each) and returns result rows tagged with ``item`` (1-based). Semantics are
those of one call each: each gets its own rows (per-item failures are
statuses in those rows, for the caller to turn into errors).

Each item names the keys it writes (an entry; the two balance holders of a
transfer). Two batches in flight in one process never share a key, and an
item waits while an earlier item with one of its keys is waiting, so items of
one key apply in arrival order and this process's batches never queue on each
other's row locks: a viral entry or a hot merchant gets one growing batch at a
time, and items behind a busy key go out in a batch of their own. (Across
processes the batch functions' lock ordering keeps them deadlock-free.)

Deadlines: a batch runs under the earliest deadline of its callers, so a call
past its deadline never has its write committed. If that deadline cuts the
batch short, nothing was written: the expired callers get DEADLINE_EXCEEDED
and the others go back to the head of the queue. A caller that has gone
(cancelled, past its deadline) before its batch is sent is dropped from it.

At most ``max_pending`` items wait; beyond that a call is refused with
RESOURCE_EXHAUSTED rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Hashable, Iterable
from typing import Any

import asyncpg

from nexus.database import Database, call_deadline
from nexus.errors import DeadlineExceeded, NexusError, ResourceExhausted, Unavailable

log = logging.getLogger("nexus.group_commit")


@dataclass
class _Item:
    arguments: tuple[Any, ...]
    keys: frozenset[Hashable]
    deadline: float | None
    rows: asyncio.Future[list[asyncpg.Record]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    def __init__(
        self, db: Database, name: str, query: str, *, max_batch: int = 256, max_in_flight: int = 4,
        min_batch: int = 8, max_pending: int = 10_000,
    ) -> None:
        self._db = db
        self._name = name
        self._query = query
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._min_batch = min_batch
        self._max_pending = max_pending
        self._pending: list[_Item] = []
        self._busy_keys: set[Hashable] = set()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, keys: Iterable[Hashable], *arguments: Any) -> list[asyncpg.Record]:
        """Applies one item writing `keys`; returns its result rows."""
        if len(self._pending) >= self._max_pending:
            raise ResourceExhausted(f"more than {self._max_pending} {self._name} writes are queued")
        item = _Item(arguments, frozenset(keys), call_deadline.get())
        self._pending.append(item)
        if self._in_flight == 0 or len(self._pending) >= self._min_batch:
            self._dispatch()
        return await item.rows

    def _dispatch(self) -> None:
        while self._in_flight < self._max_in_flight:
            batch = self._take_batch()
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> list[_Item]:
        """The next batch: pending items in arrival order whose keys are free."""
        blocked = set(self._busy_keys)
        batch: list[_Item] = []
        waiting: list[_Item] = []
        scanned = 0
        for item in self._pending:
            if len(batch) == self._max_batch:
                break
            scanned += 1
            if item.rows.done():
                continue  # its caller has gone
            if blocked.isdisjoint(item.keys):
                batch.append(item)
            else:
                waiting.append(item)
                blocked |= item.keys
        self._pending = waiting + self._pending[scanned:]
        for item in batch:
            self._busy_keys |= item.keys
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        try:
            await self._send(batch)
        finally:
            self._in_flight -= 1
            for item in batch:
                self._busy_keys -= item.keys
            self._dispatch()

    async def _send(self, batch: list[_Item]) -> None:
        deadlines = [item.deadline for item in batch if item.deadline is not None]
        call_deadline.set(min(deadlines) if deadlines else None)
        try:
            rows = await self._db.fetch(self._name, self._query, *(list(column) for column in zip(*(i.arguments for i in batch))))
        except DeadlineExceeded as exc:
            now = time.monotonic()
            expired = [i for i in batch if i.deadline is not None and i.deadline <= now]
            if not expired:  # the statement ceiling, not a caller's deadline: fail them all
                expired = batch
            self._fail(expired, exc)
            self._pending[:0] = [i for i in batch if i not in expired and not i.rows.done()]
            return
        except BaseException as exc:
            if isinstance(exc, NexusError):
                failure: NexusError = exc
            elif isinstance(exc, asyncio.CancelledError):
                failure = Unavailable()
            else:
                log.exception("event=group_commit_failed function=%s items=%d", self._name, len(batch))
                failure = NexusError()
            self._fail(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        by_item: defaultdict[int, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_item[row["item"]].append(row)
        for position, item in enumerate(batch, start=1):
            if not item.rows.done():
                item.rows.set_result(by_item[position])

    @staticmethod
    def _fail(items: list[_Item], failure: BaseException) -> None:
        for item in items:
            if not item.rows.done():
                item.rows.set_exception(failure)
