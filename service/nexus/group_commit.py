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

A batch function takes a route key first, then one array per argument (item
i is the i-th element of each; an item's own key is one of them), and returns
result rows tagged with ``item`` (1-based). On Citus every item of a batch has
the same route key, which is what lets Citus delegate the call to the one
worker that owns it (docs/citus.md). An item may offer several route keys (a
transfer: its payer's and its payee's): a batch routes by the one that most
waiting items offer, the first on a tie, so payments from many payers to one
hot merchant go out together, routed by the merchant, one two-phase commit
for the batch instead of one per payment. On one node a batch carries items of
many keys — most traffic is spread over many keys, and a batch of one item
per key would be a round trip and a commit per write — and the route key is
the first item's first, unused. Semantics are
those of one call each: each gets its own rows. An item that fails alone
(a request_id reused with other arguments, a missing entry, too few tokens)
gets one row with its error in the columns ``error_code`` (one of the
service's SQLSTATEs), ``error_message`` and ``error_detail`` (the request
field, or the precondition type), as a RAISE would carry them; ``submit``
raises that error (``errors.from_raised``), so callers see rows of successes
only.

Each item names the keys it writes (an entry; the two balance holders of a
transfer). Two batches in flight in one process never share a key, and an
item waits while an earlier item with one of its keys is waiting, so items of
one key apply in arrival order and this process's batches never queue on each
other's row locks: a viral entry or a hot merchant gets one growing batch at a
time, and items behind a busy key go out in a batch of their own. (Across
processes the batch functions' lock ordering keeps them deadlock-free.)

Deadlines and failures: a batch runs until the latest deadline of its
callers, so one impatient caller never cuts short the others' writes; a caller
whose own deadline passes stops waiting with DEADLINE_EXCEEDED (nothing was
written if its item had not been sent yet; otherwise its outcome is unknown —
the batch may still commit it). A batch is sent once and never re-sent: when it
fails, every item gets the batch's error, which says whether anything may
have been written (``errors.from_database``: an ERROR that rolled the batch
back wrote nothing; a lost connection, an ended backend or a deadline leave
the outcome unknown), and re-applying it blindly could apply a write twice (a
toggle flipped back, an acknowledged state that is not the database's). A caller that
has gone (cancelled, past its deadline) before its batch is sent is dropped
from it.

At most ``max_pending`` items wait; beyond that a call is refused with
RESOURCE_EXHAUSTED rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from nexus.database import Database, call_deadline
from nexus.errors import DeadlineExceeded, NexusError, ResourceExhausted, Unavailable, from_raised
from nexus.metrics import GROUP_COMMIT_BATCH_ITEMS
from nexus.queries import Query

log = logging.getLogger("nexus.group_commit")


@dataclass
class _Item:
    route_keys: tuple[Hashable, ...]
    arguments: tuple[Any, ...]
    keys: frozenset[Hashable]
    deadline: float | None
    sent: bool = False
    rows: asyncio.Future[list[asyncpg.Record]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    def __init__(
        self, db: Database, query: Query, *, max_batch: int = 256, max_in_flight: int = 4,
        min_batch: int = 8, max_pending: int = 10_000,
    ) -> None:
        self._db = db
        self._query = query
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._min_batch = min_batch
        self._max_pending = max_pending
        self._one_route_key_per_batch = db.distributed
        self._batch_items = GROUP_COMMIT_BATCH_ITEMS.labels(query.name)
        self._pending: list[_Item] = []
        self._busy_keys: set[Hashable] = set()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(
        self, route_keys: tuple[Hashable, ...], keys: Iterable[Hashable], *arguments: Any
    ) -> list[asyncpg.Record]:
        """Applies one item writing `keys`, routed by one of `route_keys`; returns its result
        rows, or raises the error the batch function reported for it."""
        if len(self._pending) >= self._max_pending:
            raise ResourceExhausted(f"more than {self._max_pending} {self._query.name} writes are queued")
        deadline = call_deadline.get()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded.not_sent()
        item = _Item(route_keys, arguments, frozenset(keys), deadline)
        self._pending.append(item)
        if self._in_flight == 0 or len(self._pending) >= self._min_batch:
            self._dispatch()
        try:
            async with asyncio.timeout(remaining):
                return await item.rows
        except TimeoutError:
            raise DeadlineExceeded() if item.sent else DeadlineExceeded.not_sent() from None

    def _dispatch(self) -> None:
        while self._in_flight < self._max_in_flight:
            route_key, batch = self._take_batch()
            if not batch:
                return
            self._in_flight += 1
            self._batch_items.observe(len(batch))
            task = asyncio.get_running_loop().create_task(self._run(route_key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> tuple[Hashable, list[_Item]]:
        """The next batch and its route key: pending items whose keys are free, in
        arrival order (on Citus, of one route key)."""
        blocked = set(self._busy_keys)
        batch: list[_Item] = []
        waiting: list[_Item] = []
        route_key: Hashable = None
        scanned = 0
        for item in self._pending:
            if len(batch) == self._max_batch:
                break
            scanned += 1
            if item.rows.done():
                continue  # its caller has gone
            if blocked.isdisjoint(item.keys) and (
                not batch or not self._one_route_key_per_batch or route_key in item.route_keys
            ):
                if not batch:
                    route_key = self._route_key_of(item)
                batch.append(item)
            else:
                waiting.append(item)
                blocked |= item.keys
        self._pending = waiting + self._pending[scanned:]
        for item in batch:
            item.sent = True
            self._busy_keys |= item.keys
        return route_key, batch

    def _route_key_of(self, item: _Item) -> Hashable:
        """The route key of a batch that starts with `item`: of its route keys, the one
        most of the next ``max_batch`` waiting items offer (the first on a tie)."""
        if len(item.route_keys) == 1 or not self._one_route_key_per_batch:
            return item.route_keys[0]
        offered = Counter(
            key for waiting in self._pending[: self._max_batch] for key in waiting.route_keys if key in item.route_keys
        )
        return max(item.route_keys, key=lambda key: offered[key])

    async def _run(self, route_key: Hashable, batch: list[_Item]) -> None:
        try:
            await self._send(route_key, batch)
        finally:
            self._in_flight -= 1
            for item in batch:
                self._busy_keys -= item.keys
            self._dispatch()

    async def _send(self, route_key: Hashable, batch: list[_Item]) -> None:
        deadlines = [item.deadline for item in batch]
        deadline = None if None in deadlines else max(deadlines)  # type: ignore[type-var]
        call_deadline.set(deadline)
        try:
            # Bounded as a whole, waiting for a connection included: a batch must
            # not hold its keys past every caller's deadline.
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                columns = (list(column) for column in zip(*(i.arguments for i in batch), strict=True))
                rows = await self._db.fetch(self._query, route_key, *columns)
        except TimeoutError:  # the outcome is unknown if the statement was sent
            self._fail(batch, DeadlineExceeded())
            return
        except BaseException as exc:
            if isinstance(exc, NexusError):
                failure: NexusError = exc
            elif isinstance(exc, asyncio.CancelledError):
                failure = Unavailable("the server is shutting down; the write's outcome is unknown")
            else:
                log.exception("event=group_commit_failed function=%s items=%d", self._query.name, len(batch))
                failure = NexusError()
            self._fail(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        by_item: defaultdict[int, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_item[row["item"]].append(row)
        for position, item in enumerate(batch, start=1):
            if item.rows.done():
                continue
            item_rows = by_item[position]
            if item_rows and item_rows[0]["error_code"] is not None:
                failed = item_rows[0]
                item.rows.set_exception(
                    from_raised(failed["error_code"], failed["error_message"], failed["error_detail"] or "")
                )
            else:
                item.rows.set_result(item_rows)

    @staticmethod
    def _fail(items: list[_Item], failure: BaseException) -> None:
        for item in items:
            if not item.rows.done():
                item.rows.set_exception(failure)
