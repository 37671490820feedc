"""Schema migrations: numbered db/NNNN_*.sql files applied once and the
repeatable db/functions/*.sql files re-applied when they change, one
transaction each, recorded with their SHA-256, serialised by an advisory lock,
idempotent.

Each test migrates its own empty database (CREATE DATABASE without a template),
not the pre-migrated template the other tests clone.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from nexus import database
from nexus.migrations import (
    FUNCTION_FILES,
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    load_migrations,
    load_repeatables,
    migrate,
    statements,
)

from support.databases import with_database

DB_DIR = Path(__file__).resolve().parents[2] / "db"

EXTRA = Migration("0002_extra.sql", "CREATE TABLE extra_thing (id integer PRIMARY KEY);")
LATER = Migration("0003_later.sql", "CREATE TABLE later_thing (id integer PRIMARY KEY);")

_names = itertools.count()

Connect = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture
async def connect(pg_admin_url: str) -> AsyncIterator[Connect]:
    """Opens connections to a fresh, empty (unmigrated) database; closes them and drops it afterwards."""
    name = f"nexus_empty_{os.getpid()}_{next(_names)}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    opened: list[asyncpg.Connection] = []

    async def open_connection() -> asyncpg.Connection:
        conn = await database.connect(with_database(pg_admin_url, name))
        opened.append(conn)
        return conn

    try:
        yield open_connection
    finally:
        for conn in opened:
            await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def conn(connect: Connect) -> asyncpg.Connection:
    return await connect()


async def recorded(conn: asyncpg.Connection, table: str = "schema_migrations") -> dict[str, str]:
    """name → checksum of schema_migrations (or schema_repeatables), in application order."""
    rows = await conn.fetch(f"SELECT name, checksum FROM {table} ORDER BY applied_time, name")
    return {r["name"]: r["checksum"] for r in rows}


def every_file() -> list[str]:
    """The names migrate applies to an empty database, in order."""
    return [m.name for m in load_migrations()] + [m.name for m in load_repeatables()]


async def table_exists(conn: asyncpg.Connection, name: str) -> bool:
    return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)


async def schema_fingerprint(conn: asyncpg.Connection) -> set[str]:
    """Relations, columns, functions (with a hash of their bodies) and types of schema public."""
    rows = await conn.fetch(
        """SELECT 'relation ' || c.relname || ' ' || c.relkind::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'
           UNION ALL
           SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
             FROM information_schema.columns WHERE table_schema = 'public'
           UNION ALL
           SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') ' || md5(p.prosrc)
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
           UNION ALL
           SELECT 'type ' || t.typname || ' ' || t.typtype::text
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'public'
           UNION ALL
           SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal"""
    )
    return {r[0] for r in rows}


def test_migration_files_are_ordered_and_loaded() -> None:
    files = sorted(p.name for p in DB_DIR.glob("*.sql") if p.name != "schema.sql")  # schema.sql: generated
    assert files[0] == "0001_baseline.sql", files
    assert all(name[:4].isdigit() and name[4] == "_" for name in files), files
    assert [m.name for m in load_migrations()] == files
    functions = sorted(p.name for p in (DB_DIR / "functions").glob("*.sql"))
    assert sorted(FUNCTION_FILES) == functions
    assert [m.name for m in load_repeatables()] == [f"functions/{name}" for name in FUNCTION_FILES]


def test_each_function_is_defined_once_and_none_has_a_version_suffix() -> None:
    sql = "\n".join(p.read_text() for p in [*DB_DIR.glob("0*.sql"), *(DB_DIR / "functions").glob("*.sql")])
    names = re.findall(r"CREATE (?:OR REPLACE )?FUNCTION (\w+)", sql)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert not [n for n in names if re.search(r"_v\d+$", n)]


def test_a_function_file_is_sent_one_statement_at_a_time() -> None:
    sql = (
        "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $body$ BEGIN RETURN 'a;b'; END $body$;\n"
        "-- a comment; not a statement\n"
        "CREATE FUNCTION g() RETURNS text LANGUAGE sql RETURN 'it''s; fine' /* ; */;\n"
        "CREATE FUNCTION e() RETURNS text LANGUAGE sql RETURN E'it\\'s; escaped' || time'12:00';\n"
        "-- the end\n"
    )
    assert [re.findall(r"FUNCTION (\w+)", s) for s in statements(sql)] == [["f"], ["g"], ["e"]]
    assert "".join(statements(sql)) + "\n-- the end\n" == sql
    with pytest.raises(MigrationError, match="BEGIN ATOMIC"):
        statements("CREATE FUNCTION h() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;")
    with pytest.raises(MigrationError, match="nests"):
        statements("/* a /* b */ ; */ SELECT 1;")


async def test_empty_database_gets_every_file_recorded_with_its_sha256(conn: asyncpg.Connection) -> None:
    files = sorted(p for p in DB_DIR.glob("*.sql") if p.name != "schema.sql")

    applied = await migrate(conn)

    assert applied == every_file()
    assert await recorded(conn) == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert await recorded(conn, "schema_repeatables") == {
        f"functions/{name}": hashlib.sha256((DB_DIR / "functions" / name).read_bytes()).hexdigest()
        for name in FUNCTION_FILES
    }
    assert await table_exists(conn, "reactions")


async def test_applying_twice_is_a_no_op(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    before = await recorded(conn), await schema_fingerprint(conn)

    assert await migrate(conn) == []
    assert (await recorded(conn), await schema_fingerprint(conn)) == before


async def test_only_pending_files_are_applied_in_order(conn: asyncpg.Connection) -> None:
    base = load_migrations()
    await migrate(conn, base)

    assert await migrate(conn, [*base, EXTRA, LATER]) == [EXTRA.name, LATER.name]  # the functions are unchanged
    assert list(await recorded(conn)) == [*(m.name for m in base), EXTRA.name, LATER.name]


async def test_concurrent_migrators_apply_each_file_exactly_once(connect: Connect) -> None:
    first, second = await connect(), await connect()
    files = [*load_migrations(), EXTRA]

    results = await asyncio.gather(migrate(first, files), migrate(second, files))

    assert sorted(results[0] + results[1]) == sorted([m.name for m in files] + every_file()[len(load_migrations()):])
    assert not set(results[0]) & set(results[1])
    assert await first.fetchval("SELECT count(*) FROM schema_migrations") == len(files)
    assert await first.fetchval("SELECT count(*) FROM schema_repeatables") == len(FUNCTION_FILES)


async def test_a_migrator_waits_for_the_advisory_lock(connect: Connect) -> None:
    holder, migrator = await connect(), await connect()
    await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    task = asyncio.create_task(migrate(migrator))
    try:
        waiting_pid = migrator.get_server_pid()
        for _ in range(200):  # bounded: up to ~10 s
            if await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid = $1", waiting_pid
            ):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the second migrator never waited on the advisory lock")
        assert not task.done()
        assert not await table_exists(holder, "schema_migrations")
    finally:
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    assert await asyncio.wait_for(task, 30) == every_file()


async def test_an_edited_applied_migration_is_an_error_and_changes_nothing(conn: asyncpg.Connection) -> None:
    base = load_migrations()
    await migrate(conn, base)
    before = await recorded(conn), await schema_fingerprint(conn)
    edited = [Migration(base[0].name, base[0].sql + "\n-- edited after it was applied\n"), *base[1:], EXTRA]

    with pytest.raises(MigrationError, match=base[0].name):
        await migrate(conn, edited)

    assert (await recorded(conn), await schema_fingerprint(conn)) == before
    # The lock was released: the unedited files still migrate (to nothing new but EXTRA).
    assert await migrate(conn, [*base, EXTRA]) == [EXTRA.name]


async def test_an_edited_migration_after_a_pending_one_changes_nothing(conn: asyncpg.Connection) -> None:
    """History 0001, 0003 (a branch merged out of order); 0002 is new and 0003 was edited:
    the edit is an error, and 0002 must not be applied on the way to finding it."""
    base = load_migrations()
    await migrate(conn, [*base, LATER])
    before = await recorded(conn), await schema_fingerprint(conn)

    with pytest.raises(MigrationError, match=LATER.name):
        await migrate(conn, [*base, EXTRA, Migration(LATER.name, LATER.sql + " -- edited")])

    assert not await table_exists(conn, "extra_thing")
    assert (await recorded(conn), await schema_fingerprint(conn)) == before


async def test_a_failing_migration_rolls_back_entirely_and_is_not_recorded(conn: asyncpg.Connection) -> None:
    base = load_migrations()
    bad = Migration("0002_bad.sql", "CREATE TABLE half_done (id integer);\nSELECT no_such_function();")

    with pytest.raises((asyncpg.PostgresError, MigrationError)):
        await migrate(conn, [*base, bad])

    assert list(await recorded(conn)) == [m.name for m in base]  # the good file before it stays applied
    assert not await table_exists(conn, "half_done")
    fixed = Migration(bad.name, "CREATE TABLE half_done (id integer);")
    assert await migrate(conn, [*base, fixed]) == [fixed.name, *every_file()[len(base):]]  # the functions come after
    assert await table_exists(conn, "half_done")


@pytest.mark.single_node(
    "compares the clone with a fresh migration on the one server; a cluster database also holds Citus's own "
    "objects (test_citus_distributed checks the distributed schema and that a second migrate changes nothing)"
)
async def test_template_clone_and_fresh_migration_have_the_same_schema(
    conn: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    """Cheap drift check: the cloned template other tests use equals a from-scratch migration."""
    await migrate(conn)

    assert await schema_fingerprint(conn) == await schema_fingerprint(db)
    assert await recorded(conn) == await recorded(db)


async def test_a_changed_repeatable_file_is_applied_again_and_alone(conn: asyncpg.Connection) -> None:
    repeatables = load_repeatables()
    await migrate(conn)
    first = await recorded(conn, "schema_repeatables")
    tokens = next(i for i, r in enumerate(repeatables) if r.name == "functions/tokens.sql")
    changed = Migration(repeatables[tokens].name, repeatables[tokens].sql.replace(
        "'the token ledger is append-only'", "'the token ledger is append-only, always'"))
    assert changed.sql != repeatables[tokens].sql

    assert await migrate(conn, repeatables=[*repeatables[:tokens], changed, *repeatables[tokens + 1:]]) == [changed.name]

    assert await recorded(conn, "schema_repeatables") == {**first, changed.name: changed.checksum}
    assert "append-only, always" in await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'forbid_ledger_changes'")
    # The ledger's triggers were replaced, not duplicated.
    assert await conn.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'token_transactions'::regclass AND NOT tgisinternal"
    ) == 2
    # Back to the file as it is: applied again; then nothing.
    assert await migrate(conn) == [changed.name]
    assert await migrate(conn) == []


async def test_a_failing_repeatable_file_rolls_back_and_is_applied_once_fixed(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    before = await recorded(conn, "schema_repeatables"), await schema_fingerprint(conn)
    repeatables = load_repeatables()
    broken = Migration(
        repeatables[-1].name,
        repeatables[-1].sql + "\nCREATE FUNCTION half_done() RETURNS int RETURN 1;\nSELECT no_such_function();",
    )

    with pytest.raises(asyncpg.PostgresError):
        await migrate(conn, repeatables=[*repeatables[:-1], broken])

    assert (await recorded(conn, "schema_repeatables"), await schema_fingerprint(conn)) == before
    assert await migrate(conn) == []


async def test_a_database_of_the_old_layout_is_refused_in_one_line(conn: asyncpg.Connection) -> None:
    """A data directory made before the baseline (its history names 0001_interactions.sql
    and so on) cannot be upgraded: the migrator says so, and changes nothing."""
    await conn.execute(
        """CREATE TABLE schema_migrations (name text PRIMARY KEY, checksum text NOT NULL,
                                           applied_time timestamptz NOT NULL DEFAULT now());
           INSERT INTO schema_migrations (name, checksum) VALUES ('0001_interactions.sql', 'x'), ('0002_follows.sql', 'y')"""
    )

    with pytest.raises(MigrationError) as raised:
        await migrate(conn)

    message = str(raised.value)
    assert "\n" not in message
    assert "predates the baseline" in message and "new data directory" in message
    assert not await table_exists(conn, "schema_repeatables")
    assert not await table_exists(conn, "reactions")
