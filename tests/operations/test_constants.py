"""Values the service and the database share have one home on each side:
``nexus/constants.py``, and an IMMUTABLE SQL function each (db/functions/common.sql).
The two sides agree, and no function of the current schema writes one of the
values out instead of calling its function."""

from __future__ import annotations

import re

import asyncpg

from nexus import constants

# SQL function -> the Python constant it must equal.
SHARED = {
    "memory_events_channel": constants.EVENTS_CHANNEL,
    "broadcasts_channel": constants.BROADCASTS_CHANNEL,
    "maintenance_lock_key": constants.MAINTENANCE_LOCK_KEY,
}
# SQL function -> how its value looks written out in SQL.
WRITTEN_OUT = {
    "memory_events_channel": re.compile(re.escape(f"'{constants.EVENTS_CHANNEL}'")),
    "broadcasts_channel": re.compile(re.escape(f"'{constants.BROADCASTS_CHANNEL}'")),
    "maintenance_lock_key": re.compile(rf"\b{constants.MAINTENANCE_LOCK_KEY}\b"),
    "arc_gravity_threshold": re.compile(r"gravity_score\s*>=\s*0\.8(?!\d)"),
}


async def test_python_constants_equal_the_database_functions(db: asyncpg.Connection) -> None:
    for function, value in SHARED.items():
        assert await db.fetchval(f"SELECT {function}()") == value, function


def test_advisory_lock_keys_are_distinct() -> None:
    keys = [constants.MIGRATION_LOCK_KEY, constants.MAINTENANCE_LOCK_KEY, constants.VECTOR_INDEX_LOCK_KEY]
    assert len(set(keys)) == len(keys)


async def test_no_function_writes_a_shared_value_out(db: asyncpg.Connection) -> None:
    definitions = await db.fetch(
        """SELECT p.proname, pg_get_functiondef(p.oid) AS definition FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
             AND NOT EXISTS (SELECT FROM pg_depend d  -- not pgvector's
                             WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')"""
    )
    names = {row["proname"] for row in definitions}
    assert set(WRITTEN_OUT) <= names
    assert {"emit_memory_event", "build_arc", "create_memory", "update_memory", "run_maintenance"} <= names
    written_out = [
        (row["proname"], home)
        for row in definitions
        for home, pattern in WRITTEN_OUT.items()
        if row["proname"] != home and pattern.search(row["definition"])
    ]
    assert written_out == []
