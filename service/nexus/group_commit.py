"""Group commit: concurrent writes of one kind applied by one database call.

Calls that arrive while earlier batches are in flight are coalesced into one
call of a batch function (``apply_reactions``, ``apply_token_operations``):
one round trip and one commit for many writes, which is what lets a viral
entry or a hot merchant take writes at the database's pace rather than the
pace of per-call overheads. At low load every call is its own batch of one,
so nothing waits for company.

A batch function takes one array per argument (item i is the i-th element of
each) and returns result rows tagged with ``item`` (1-based). Semantics are
those of one call each: items are applied in arrival order, and each gets its
own rows (per-item failures are statuses in those rows, for the caller to
turn into errors). The batch's database deadline is the latest deadline of its
callers; a caller that has already gone (cancelled or past its deadline)
before its batch is sent is dropped from it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from nexus.database import Database, call_deadline
from nexus.errors import NexusError, Unavailable


@dataclass
class _Item:
    arguments: tuple[Any, ...]
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
        self._in_flight = 0

    async def submit(self, *arguments: Any) -> list[asyncpg.Record]:
        """Applies one item; returns its result rows."""
        item = _Item(arguments, call_deadline.get())
        self._pending.append(item)
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await item.rows

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = [item for item in self._pending[: self._max_batch] if not item.rows.done()]
                del self._pending[: self._max_batch]
                if batch:
                    await self._send(batch)
        finally:
            self._in_flight -= 1

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
