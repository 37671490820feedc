"""Group commit for reaction writes (toggles and sets of resonance / amplification).

Calls that arrive while earlier batches are in flight are coalesced into one
``apply_reactions`` call: one round trip and one commit for many writes, which
is what lets a viral entry take likes at the database's pace rather than the
pace of per-call overheads. At low load every call is its own batch of one, so
nothing waits for company.

Semantics are those of one call each: items are applied in arrival order
(so a user's toggles keep their order), each gets its own outcome, and an
entry that is missing or invisible fails only its own item. A batch's database
deadline is the latest deadline of its callers; a caller that has already gone
(cancelled or past its deadline) before its batch is sent is dropped from it.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import asyncpg

from nexus import queries
from nexus.database import Database, call_deadline
from nexus.errors import NexusError, NotFound, Unavailable


@dataclass
class _Write:
    op: str  # 'toggle', 'on' or 'off'
    kind: str  # 'resonance' or 'amplification'
    user_id: str
    entry_id: uuid.UUID
    deadline: float | None
    outcome: asyncio.Future[asyncpg.Record] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ReactionWriter:
    def __init__(self, db: Database, *, max_batch: int = 256, max_in_flight: int = 4) -> None:
        self._db = db
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Write] = []
        self._in_flight = 0

    async def apply(self, op: str, kind: str, user_id: str, entry_id: uuid.UUID) -> asyncpg.Record:
        """Applies one write; returns its reaction_outcome row (NotFound if the entry is not there)."""
        write = _Write(op, kind, user_id, entry_id, call_deadline.get())
        self._pending.append(write)
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await write.outcome

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = [w for w in self._pending[: self._max_batch] if not w.outcome.done()]
                del self._pending[: self._max_batch]
                if batch:
                    await self._send(batch)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[_Write]) -> None:
        deadlines = [w.deadline for w in batch]
        call_deadline.set(None if None in deadlines else max(deadlines))  # type: ignore[type-var]
        try:
            rows = await self._db.fetch(
                "apply_reactions",
                queries.APPLY_REACTIONS,
                [w.op for w in batch],
                [w.kind for w in batch],
                [w.user_id for w in batch],
                [w.entry_id for w in batch],
            )
        except BaseException as exc:
            failure = exc if isinstance(exc, NexusError) else Unavailable() if isinstance(exc, asyncio.CancelledError) else NexusError()
            for write in batch:
                if not write.outcome.done():
                    write.outcome.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for write, row in zip(batch, rows, strict=True):
            if write.outcome.done():
                continue
            if row["found"]:
                write.outcome.set_result(row)
            else:
                write.outcome.set_exception(NotFound(f"entry {write.entry_id} not found", "entry_id"))
