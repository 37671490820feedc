"""Schema migrations: the numbered files of ``db/``, then the stored functions of ``db/functions/``.

A numbered file (``NNNN_name.sql``: the tables, types and indexes, from
``0001_baseline.sql`` on) is applied once, in its own transaction, and recorded
with its SHA-256 in ``schema_migrations``; an applied file whose content has
since changed is an error, not a silent skip: a change of the tables is a new
numbered file. A file of ``db/functions/`` (the stored functions and the
triggers that call them, by area) is repeatable: applied in the order of
``FUNCTION_FILES`` when first seen and again, in its own transaction, whenever
its SHA-256 differs from the one recorded in ``schema_repeatables``. So each
function is written once, with its current body, and changed in place.
``CREATE OR REPLACE`` cannot change a function's arguments or result type, and
a function taken out of a file stays in the database: such a change drops the
old function in a new numbered migration, which runs before the files (and so
sees the functions of the release before).

A session advisory lock serialises migrators, so replicas that start together
apply each file exactly once. On a Citus coordinator with workers, the schema
is then distributed (``nexus.distribution``), under the same lock: a migrator
always connects to the coordinator, whose lock it is.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from nexus import distribution
from nexus.constants import DEFAULT_EMBEDDING_DIM, MIGRATION_LOCK_KEY

log = logging.getLogger("nexus.migrations")

# A numbered migration's file name; db/schema.sql, the generated current schema, is not one.
MIGRATION_FILE = re.compile(r"\d{4}_\w+\.sql")

# The first numbered migration; a database with a history that lacks it
# predates the baseline and cannot be upgraded.
BASELINE = "0001_baseline.sql"

# The files of db/functions/, in the order they are first applied: a SQL
# function's body is checked when it is created, so what it calls comes first.
FUNCTION_FILES = (
    "common.sql",
    "follows.sql",
    "entries.sql",
    "interactions.sql",
    "feed.sql",
    "tokens.sql",
    "streams.sql",
    "memories.sql",
    "search.sql",
    "maintenance.sql",
)

# What was applied: schema_migrations (numbered files), schema_repeatables (files of db/functions/).
HISTORY_TABLE = """CREATE TABLE IF NOT EXISTS {} (
    name text PRIMARY KEY,
    checksum text NOT NULL,
    applied_time timestamptz NOT NULL DEFAULT now())"""


class MigrationError(Exception):
    """The database's migration history does not match the migration files."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The numbered migrations, in order."""
    files = resources.files("nexus.schema")
    names = sorted(f.name for f in files.iterdir() if MIGRATION_FILE.fullmatch(f.name))
    return [Migration(name, files.joinpath(name).read_text(encoding="utf-8")) for name in names]


def load_repeatables() -> list[Migration]:
    """The files of db/functions/, in ``FUNCTION_FILES`` order, named ``functions/<file>``."""
    directory = resources.files("nexus.schema").joinpath("functions")
    present = {f.name for f in directory.iterdir() if f.name.endswith(".sql")}
    if present != set(FUNCTION_FILES):
        raise MigrationError(
            f"db/functions/ holds {sorted(present)}, but nexus.migrations.FUNCTION_FILES lists "
            f"{sorted(FUNCTION_FILES)}: list each file once, after the files it calls"
        )
    return [Migration(f"functions/{name}", directory.joinpath(name).read_text(encoding="utf-8")) for name in FUNCTION_FILES]


async def migrate(
    conn: asyncpg.Connection,
    migrations: list[Migration] | None = None,
    repeatables: list[Migration] | None = None,
    *,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    citus_without_workers: bool = False,
) -> list[str]:
    """Applies pending migrations, then new or changed repeatable files; returns
    the names applied (none: already up to date).

    ``embedding_dim`` sizes the memory embeddings when their table is created
    (the baseline reads it as ``nexus.embedding_dim``); for an existing table it
    must match, since the vector indexes are built for one dimension.

    A database with the ``citus`` extension but no active worker is refused
    (its tables would stay on the coordinator, undistributed, without a word)
    unless ``citus_without_workers``.
    """
    migrations = load_migrations() if migrations is None else migrations
    repeatables = load_repeatables() if repeatables is None else repeatables
    if not citus_without_workers and await distribution.has_citus_without_workers(conn):
        raise MigrationError(
            "this database has the citus extension but no active worker in pg_dist_node: add the workers "
            "in this database (SELECT citus_add_node(host, port), docs/citus.md) or set "
            "NEXUS_CITUS_WITHOUT_WORKERS=true to keep its tables on the coordinator"
        )
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute("SELECT set_config('nexus.embedding_dim', $1, false)", str(embedding_dim))
        await conn.execute(HISTORY_TABLE.format("schema_migrations"))
        applied = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")}
        _check_history(applied, migrations)
        await conn.execute(HISTORY_TABLE.format("schema_repeatables"))
        newly_applied = []
        for migration in migrations:
            if migration.name in applied:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", migration.name, migration.checksum
                )
            log.info("event=migration_applied name=%s", migration.name)
            newly_applied.append(migration.name)
        newly_applied += await _apply_repeatables(conn, repeatables)
        await _check_embedding_dim(conn, embedding_dim)
        await distribution.distribute(conn)
        return newly_applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


def _check_history(applied: dict[str, str], migrations: list[Migration]) -> None:
    """Raises unless every applied migration is one of these files, unchanged."""
    if applied and BASELINE not in applied:
        raise MigrationError(
            "this database predates the baseline schema (db/0001_baseline.sql) and cannot be upgraded: "
            "start from a new data directory (NEXUS_DATA_DIR) or an empty database (NEXUS_DATABASE_URL)"
        )
    for migration in migrations:  # all checked before anything is applied
        if migration.name in applied and applied[migration.name] != migration.checksum:
            raise MigrationError(
                f"migration {migration.name} was edited after it was applied "
                f"(recorded sha256 {applied[migration.name][:12]}…, file {migration.checksum[:12]}…); "
                "add a new migration instead"
            )


async def _apply_repeatables(conn: asyncpg.Connection, repeatables: list[Migration]) -> list[str]:
    """Applies each repeatable file whose checksum is not the recorded one."""
    recorded = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_repeatables")}
    citus = await conn.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')")
    applied = []
    for repeatable in repeatables:
        if recorded.get(repeatable.name) == repeatable.checksum:
            continue
        async with conn.transaction():
            if citus:
                # A re-applied file replaces triggers of distributed tables (on
                # every shard: refused unless allowed) and distributed functions
                # (which Citus refuses after a parallel operation on the shards
                # in the same transaction: one connection per node instead), one
                # statement at a time (see statements).
                await conn.execute("SET LOCAL citus.enable_unsafe_triggers = on")
                await conn.execute("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")
            for statement in statements(repeatable.sql):
                await conn.execute(statement)
            await conn.execute(
                """INSERT INTO schema_repeatables (name, checksum) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_time = now()""",
                repeatable.name, repeatable.checksum,
            )
        log.info("event=repeatable_applied name=%s", repeatable.name)
        applied.append(repeatable.name)
    return applied


# What statements() skips over: a comment, a quoted string (E'...' with its
# backslash escapes) or identifier, a dollar-quoted body; or a semicolon, which
# ends a statement.
_SQL_TOKEN = re.compile(
    r"--[^\n]*|/\*.*?\*/|\b[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|(\$\w*\$).*?\1|;", re.DOTALL
)


def statements(sql: str) -> list[str]:
    """The statements of a file of db/functions/, each sent on its own: Citus
    propagates a trigger of a distributed table with the text it was given,
    and refuses text of several commands ("cannot insert multiple commands into
    a prepared statement"). Function bodies are dollar-quoted or one RETURN
    expression, never BEGIN ATOMIC, whose inner semicolons this would split."""
    if re.search(r"\bBEGIN\s+ATOMIC\b", sql, re.IGNORECASE):
        raise MigrationError("a file of db/functions/ uses BEGIN ATOMIC; write the body dollar-quoted instead")
    found, start = [], 0
    for token in _SQL_TOKEN.finditer(sql):
        if token.group().startswith("/*") and "/*" in token.group()[2:]:
            raise MigrationError("a file of db/functions/ nests /* comments */; use -- comments instead")
        if token.group() == ";":
            found.append(sql[start:token.end()])
            start = token.end()
    found.append(sql[start:])
    return [s for s in found if _SQL_TOKEN.sub("", s).strip()]


async def _check_embedding_dim(conn: asyncpg.Connection, expected: int) -> None:
    stored = await conn.fetchval(
        """SELECT atttypmod FROM pg_attribute
           WHERE attrelid = to_regclass('memories') AND attname = 'embedding'"""
    )
    if stored is not None and stored != expected:
        raise MigrationError(
            f"the memories table holds {stored}-dimensional embeddings, but the embedding dimension "
            f"is set to {expected}; set NEXUS_EMBEDDING_DIM={stored} or use a new database"
        )
