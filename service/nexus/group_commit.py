"""Group commit: concurrent writes of one kind applied by one database call.

Calls that arrive while earlier batches are in flight are coalesced into one
call of a batch function (``apply_reactions``, ``apply_token_operations``):
one round trip and one commit for many writes, which is what lets a viral
entry or a hot merchant take writes at the database's pace rather than the
pace of per-call overheads. At low load every call is its own batch of one,
so nothing waits for company.

A batch function takes one array per argument (item i is the i-th element of
each) and returns result rows tagged with ``item`` (1-based). Semantics are
those of one call each: each gets its own rows (per-item failures are
statuses in those rows, for the caller to turn into errors).

Each item names the keys it writes (an entry; the two balance holders of a
transfer). Two batches in flight never share a key, and an item waits while
an earlier item with one of its keys is waiting, so items of one key apply in
arrival order and batches never queue on each other's row locks: a viral entry
or a hot merchant gets one growing batch at a time, while quiet keys spread
over several. The batch's database deadline is the latest deadline of its
callers; a caller that has already gone (cancelled or past its deadline)
before its batch is sent is dropped from it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Hashable, Iterable
from typing import Any

import asyncpg

from nexus.database import Database, call_deadline
from nexus.errors import NexusError, Unavailable


@dataclass
class _Item:
    arguments: tuple[Any, ...]
    keys: frozenset[Hashable]
    deadline: float | None
    rows: asyncio.Future[list[asyncpg.Record]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    def __init__(self, db: Database, name: str, query: str, *, max_batch: int = 256, max_in_flight: int = 4) -> None:
        self._db = db
        self._name = name
        self._query = query
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Item] = []
        self._busy_keys: set[Hashable] = set()
        self._in_flight = 0

    async def submit(self, keys: Iterable[Hashable], *arguments: Any) -> list[asyncpg.Record]:
        """Applies one item writing `keys`; returns its result rows."""
        item = _Item(arguments, frozenset(keys), call_deadline.get())
        self._pending.append(item)
        self._dispatch()
        return await item.rows

    def _dispatch(self) -> None:
        while self._in_flight < self._max_in_flight:
            batch = self._take_batch()
            if not batch:
                return
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    def _take_batch(self) -> list[_Item]:
        """The next batch: pending items in arrival order whose keys are free."""
        blocked = set(self._busy_keys)
        batch: list[_Item] = []
        waiting: list[_Item] = []
        for item in self._pending:
            if item.rows.done():
                continue  # its caller has gone
            if len(batch) < self._max_batch and blocked.isdisjoint(item.keys):
                batch.append(item)
            else:
                waiting.append(item)
                blocked |= item.keys
        self._pending = waiting
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
        deadlines = [item.deadline for item in batch]
        call_deadline.set(None if None in deadlines else max(deadlines))  # type: ignore[type-var]
        try:
            rows = await self._db.fetch(self._name, self._query, *(list(column) for column in zip(*(i.arguments for i in batch))))
        except BaseException as exc:
            failure = exc if isinstance(exc, NexusError) else Unavailable() if isinstance(exc, asyncio.CancelledError) else NexusError()
            for item in batch:
                if not item.rows.done():
                    item.rows.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        by_item: defaultdict[int, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_item[row["item"]].append(row)
        for position, item in enumerate(batch, start=1):
            if not item.rows.done():
                item.rows.set_result(by_item[position])
