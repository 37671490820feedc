"""Schema migrations: the ordered ``NNNN_name.sql`` files of ``db/``.

Each file is applied once, in its own transaction, and recorded with its
SHA-256; an applied file whose content has since changed is an error, not a
silent skip. A session advisory lock serialises migrators, so replicas that
start together apply each file exactly once. On a Citus coordinator with
workers, the schema is then distributed (``nexus.distribution``), under the
same lock: a migrator always connects to the coordinator, whose lock it is.
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

# A migration's file name; db/schema.sql, the generated current schema, is not one.
MIGRATION_FILE = re.compile(r"\d{4}_\w+\.sql")


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
    files = resources.files("nexus.schema")
    names = sorted(f.name for f in files.iterdir() if MIGRATION_FILE.fullmatch(f.name))
    return [Migration(name, files.joinpath(name).read_text(encoding="utf-8")) for name in names]


async def migrate(
    conn: asyncpg.Connection, migrations: list[Migration] | None = None, *, embedding_dim: int = DEFAULT_EMBEDDING_DIM
) -> list[str]:
    """Applies pending migrations; returns the names applied (none: already up to date).

    ``embedding_dim`` sizes the memory embeddings when their table is created
    (migrations read it as ``nexus.embedding_dim``); for an existing table it
    must match, since the vector indexes are built for one dimension.
    """
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute("SELECT set_config('nexus.embedding_dim', $1, false)", str(embedding_dim))
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   name text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_time timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")}
        for migration in migrations:  # all checked before anything is applied
            if migration.name in applied and applied[migration.name] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.name} was edited after it was applied "
                    f"(recorded sha256 {applied[migration.name][:12]}…, file {migration.checksum[:12]}…); "
                    "add a new migration instead"
                )
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
        await _check_embedding_dim(conn, embedding_dim)
        await distribution.distribute(conn)
        return newly_applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


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
