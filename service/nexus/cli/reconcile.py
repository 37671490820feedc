"""Recounting every counter from the rows it counts.

A healthy database has no drift: counters change in the same transaction as
their rows. ``nexus reconcile`` is the audit that proves it (and the repair,
with --fix, should anything ever write rows behind the triggers' back).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from nexus import queries

RECONCILERS = (
    ("entry_counters", queries.RECONCILE_ENTRY_COUNTERS),
    ("follow_counters", queries.RECONCILE_FOLLOW_COUNTERS),
    ("balances", queries.RECONCILE_BALANCES),
)


async def reconcile(conn: asyncpg.Connection, *, fix: bool) -> list[dict[str, Any]]:
    """Every counter that differs from its rows, as dicts; repaired when fix is set."""
    drift: list[dict[str, Any]] = []
    async with conn.transaction():
        for name, query in RECONCILERS:
            drift.extend({"check": name, **dict(row)} for row in await conn.fetch(query.sql, fix))
    return drift
