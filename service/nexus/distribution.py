"""Distribution of the schema over a Citus cluster (docs/citus.md).

``nexus.migrations.migrate`` calls :func:`distribute` after the migrations, under
the migration lock, on every run: when the database is a Citus coordinator with
at least one active primary worker, every table that grows with users or entries
is hash-distributed (by user, or by entry, each group co-located) and the hot
functions are delegated to the worker that owns their key. On a plain
PostgreSQL (or a Citus coordinator without workers) it does nothing. Each step
is skipped when the catalog shows it done, so a second run does nothing and a
run cut short is finished by the next.

A table or function added by a later migration belongs in the plan below: a
table that is neither in the plan (``TABLES``, ``REFERENCE_TABLES``) nor in
``LOCAL_TABLES`` stops the migration rather than staying on the coordinator
unnoticed.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("nexus.distribution")


class DistributionError(Exception):
    """The schema has a table the distribution plan does not place."""


# (table, distribution column, co-located with): the first table of a group
# starts it. Referenced tables come before the tables whose foreign keys
# reference them.
BY_USER = "balances"
BY_ENTRY = "entries"
TABLES: tuple[tuple[str, str, str], ...] = (
    (BY_USER, "user_id", "none"),
    ("token_transactions", "user_id", BY_USER),
    ("token_requests", "user_id", BY_USER),
    ("memory_users", "user_id", BY_USER),
    ("memories", "user_id", BY_USER),
    ("memory_requests", "user_id", BY_USER),
    ("memory_arcs", "user_id", BY_USER),
    ("memory_arc_members", "user_id", BY_USER),
    ("memory_events", "user_id", BY_USER),
    ("memory_sessions", "user_id", BY_USER),
    ("memory_patterns", "user_id", BY_USER),
    ("memory_terms", "user_id", BY_USER),
    ("consciousness_cache", "user_id", BY_USER),
    ("user_interactions", "user_id", BY_USER),
    ("follows", "follower_id", BY_USER),
    ("follow_counter_shards", "user_id", BY_USER),
    ("shares", "user_id", BY_USER),
    ("entry_requests", "author_id", BY_USER),
    ("feed_actors", "user_id", BY_USER),
    ("feed_activities", "actor_id", BY_USER),
    ("home_feed", "reader_id", BY_USER),
    # By its own id, hashed as a user id is: PostPendingTransfer names only the
    # id, and a call routed by it runs on the worker that holds the transfer.
    ("pending_transfers", "pending_transfer_id", BY_USER),
    (BY_ENTRY, "entry_id", "none"),
    ("reactions", "entry_id", BY_ENTRY),
    ("entry_counter_shards", "entry_id", BY_ENTRY),
)

# Held whole by every node (small, read by every worker): the broadcasters'
# activities, which every follower's page reads on its own worker.
REFERENCE_TABLES = ("broadcast_activities",)

# Touched only by coordinator-side code (migrations, the maintenance election).
LOCAL_TABLES = frozenset({"schema_migrations", "schema_repeatables", "maintenance_runs"})

# (function, argument that names the owning key, co-located with): a call runs
# on the worker that owns the key, in one hop. Statements of another key inside
# it (a transfer's payee, a follow's second counter) still work: the worker runs
# them as a distributed transaction (two-phase commit).
FUNCTIONS: tuple[tuple[str, str, str], ...] = (
    ("apply_token_operations", "p_route_user_id", BY_USER),
    ("list_transactions", "p_user_id", BY_USER),
    ("set_account_policy", "p_user_id", BY_USER),
    ("create_memory", "p_user_id", BY_USER),
    ("create_memories", "p_route_user_id", BY_USER),
    ("update_memory", "p_user_id", BY_USER),
    ("delete_memory", "p_user_id", BY_USER),
    ("set_identity_entities", "p_user_id", BY_USER),
    ("get_memory", "p_user_id", BY_USER),
    ("list_memories", "p_user_id", BY_USER),
    ("search_memories", "p_user_id", BY_USER),
    ("list_arcs", "p_user_id", BY_USER),
    ("memory_stream_position", "p_user_id", BY_USER),
    ("touch_session", "p_user_id", BY_USER),
    ("list_sessions", "p_user_id", BY_USER),
    ("record_pattern", "p_user_id", BY_USER),
    ("list_patterns", "p_user_id", BY_USER),
    ("record_interaction", "p_user_id", BY_USER),
    ("list_interactions", "p_user_id", BY_USER),
    ("follow", "p_follower_id", BY_USER),
    ("unfollow", "p_follower_id", BY_USER),
    ("follow_states", "p_user_id", BY_USER),
    ("list_following", "p_user_id", BY_USER),
    ("record_share", "p_user_id", BY_USER),
    ("list_home_feed", "p_viewer", BY_USER),
    ("apply_reactions", "p_route_entry_id", BY_ENTRY),
    ("delete_entry", "p_entry_id", BY_ENTRY),
    ("list_reactors", "p_entry_id", BY_ENTRY),
)


async def has_citus(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"))


async def _active_workers(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval("SELECT count(*) FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary' AND isactive")
    )


async def is_cluster(conn: asyncpg.Connection) -> bool:
    """Whether the database is a Citus coordinator with an active primary worker."""
    return await has_citus(conn) and await _active_workers(conn) > 0


async def has_citus_without_workers(conn: asyncpg.Connection) -> bool:
    return await has_citus(conn) and await _active_workers(conn) == 0


async def describe(conn: asyncpg.Connection) -> str:
    """The database's layout in one line, as ``nexus migrate`` reports it."""
    if not await is_cluster(conn):
        return "layout: one PostgreSQL server" + (" (citus installed, no workers)" if await has_citus(conn) else "")
    tables = await conn.fetchval(
        "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text = ANY ($1)", [name for name, _, _ in TABLES]
    )
    replicated = await conn.fetchval(
        "SELECT count(*) FROM pg_dist_partition WHERE partmethod = 'n' AND logicalrelid::text = ANY ($1)",
        list(REFERENCE_TABLES),
    )
    functions = await conn.fetchval(
        """SELECT count(*) FROM pg_dist_object o JOIN pg_proc p ON p.oid = o.objid
           WHERE o.classid = 'pg_proc'::regclass AND o.distribution_argument_index IS NOT NULL
             AND p.proname = ANY ($1)""",
        [name for name, _, _ in FUNCTIONS],
    )
    return (f"layout: Citus, {await _active_workers(conn)} active worker(s); "
            f"{tables} of {len(TABLES)} tables distributed and {replicated} of {len(REFERENCE_TABLES)} replicated, "
            f"{functions} of {len(FUNCTIONS)} functions delegated")


def node_url(url: str, host: str, port: int, database: str) -> str:
    """``url`` with another host, port and database: the credentials stay (workers share them)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + database))


async def worker_urls(conn: asyncpg.Connection, url: str) -> list[str]:
    """``url`` pointed at each active primary worker (same credentials and database);
    none on a plain PostgreSQL or a coordinator without workers."""
    if not await is_cluster(conn):
        return []
    rows = await conn.fetch(
        """SELECT nodename, nodeport FROM pg_dist_node
           WHERE groupid <> 0 AND noderole = 'primary' AND isactive ORDER BY nodename, nodeport"""
    )
    database = urlsplit(url).path.lstrip("/")
    return [node_url(url, r["nodename"], r["nodeport"], database) for r in rows]


async def _is_distributed(conn: asyncpg.Connection, table: str) -> bool:
    """Whether Citus holds the table (hash-distributed or a reference table)."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = $1::regclass)",
                                    table))


async def distribute(conn: asyncpg.Connection) -> list[str]:
    """Distributes what is not distributed yet; returns what it did (empty: nothing to do)."""
    if not await is_cluster(conn):
        return []
    tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    unplaced = tables - LOCAL_TABLES - set(REFERENCE_TABLES) - {name for name, _, _ in TABLES}
    if unplaced:
        raise DistributionError(
            f"no distribution key for table(s) {', '.join(sorted(unplaced))}: add them to nexus.distribution"
        )
    done: list[str] = []
    # Triggers that stay (reactions_counted writes its co-located counter shard;
    # memories_rules reads its co-located user row; the append-only guards read
    # nothing) are refused by create_distributed_table unless this is on.
    await conn.execute("SET citus.enable_unsafe_triggers = on")
    try:
        for table, column, colocate_with in TABLES:
            if await _is_distributed(conn, table):
                continue
            await conn.execute(
                "SELECT create_distributed_table($1, $2, colocate_with => $3)", table, column, colocate_with
            )
            log.info("event=table_distributed table=%s column=%s colocate_with=%s", table, column, colocate_with)
            done.append(f"table {table}")
        for table in REFERENCE_TABLES:
            if await _is_distributed(conn, table):
                continue
            await conn.execute("SELECT create_reference_table($1)", table)
            log.info("event=table_replicated table=%s", table)
            done.append(f"reference table {table}")
    finally:
        await conn.execute("RESET citus.enable_unsafe_triggers")
    done += await _propagate_functions(conn)
    for function, argument, colocate_with in FUNCTIONS:
        signature = await conn.fetchval(
            """SELECT p.oid::regprocedure::text FROM pg_proc p
               WHERE p.proname = $1 AND p.pronamespace = 'public'::regnamespace""",
            function,
        )
        delegated = await conn.fetchval(
            """SELECT EXISTS (SELECT FROM pg_dist_object
                              WHERE classid = 'pg_proc'::regclass AND objid = $1::regprocedure
                                AND distribution_argument_index IS NOT NULL)""",
            signature,
        )
        if delegated:
            continue
        await conn.execute(
            "SELECT create_distributed_function($1, $2, colocate_with => $3)", signature, argument, colocate_with
        )
        log.info("event=function_delegated function=%s argument=%s colocate_with=%s", signature, argument, colocate_with)
        done.append(f"function {function}")
    done += await _set_function_settings(conn)
    return done


# Function settings on Citus only (name: (setting, value)). The batch reads of
# entries (db/functions/entries.sql) each filter one table by an array of keys,
# and only a plan made with the keys' values reads just their shards (a generic
# plan reads every shard). The writes of the broadcast_activities reference
# table (db/functions/feed.sql) are commutative: each account's are ordered by
# its feed lock, so Citus need not order different accounts' against each other.
CITUS_FUNCTION_SETTINGS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("followed_authors", "viewer_context", "visible_entries", "counter_totals_of", "reaction_states"),
                    ("plan_cache_mode", "force_custom_plan")),
    **dict.fromkeys(("broadcast_add", "broadcast_remove"), ("citus.all_modifications_commutative", "on")),
}


async def _set_function_settings(conn: asyncpg.Connection) -> list[str]:
    """Sets CITUS_FUNCTION_SETTINGS, and lets Citus plan the functions that force
    generic plans on one node (the search functions, see db/functions/search.sql)
    with their parameters' values whenever it needs to, since it cannot plan those
    generically ("could not create distributed plan"). Runs on every migration,
    since a re-applied function file resets a function's settings."""
    done: list[str] = []
    for signature in await conn.fetch(
        """SELECT p.oid::regprocedure::text FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace AND 'plan_cache_mode=force_generic_plan' = ANY (p.proconfig)"""
    ):
        await conn.execute(f"ALTER FUNCTION {signature[0]} RESET plan_cache_mode")
        log.info("event=function_plans_per_call function=%s", signature[0])
        done.append(f"plans per call {signature[0]}")
    for function, (setting, value) in CITUS_FUNCTION_SETTINGS.items():
        for signature in await conn.fetch(
            """SELECT p.oid::regprocedure::text FROM pg_proc p
               WHERE p.pronamespace = 'public'::regnamespace AND p.proname = $1
                 AND NOT coalesce($2 = ANY (p.proconfig), false)""",
            function, f"{setting}={value}",
        ):
            await conn.execute(f"ALTER FUNCTION {signature[0]} SET {setting} = {value}")
            log.info("event=function_setting function=%s setting=%s value=%s", signature[0], setting, value)
            done.append(f"{setting} = {value} for {signature[0]}")
    return done


async def _propagate_functions(conn: asyncpg.Connection) -> list[str]:
    """Creates every Nexus function on the workers too.

    Functions created before their tables were distributed exist on the
    coordinator only, and a delegated function calls others on the worker. A
    SQL function's body is checked when it is created, so one that calls
    another may fail until that one is there: each pass retries the rest, in
    dependency order by trial.
    """
    done: list[str] = []
    while True:
        pending = [
            r[0]
            for r in await conn.fetch(
                """SELECT p.oid::regprocedure::text FROM pg_proc p
                   WHERE p.pronamespace = 'public'::regnamespace
                     AND NOT EXISTS (SELECT FROM pg_depend d  -- not pgvector's
                                     WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
                     AND NOT EXISTS (SELECT FROM pg_dist_object o
                                     WHERE o.classid = 'pg_proc'::regclass AND o.objid = p.oid)
                   ORDER BY p.oid"""
            )
        ]
        if not pending:
            return done
        failures: list[asyncpg.PostgresError] = []
        for signature in pending:
            try:
                await conn.execute("SELECT create_distributed_function($1)", signature)
            except asyncpg.PostgresError as exc:
                failures.append(exc)
                continue
            done.append(f"function {signature}")
        if len(failures) == len(pending):
            raise failures[0]
