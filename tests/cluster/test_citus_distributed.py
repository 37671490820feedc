"""Nexus's schema distributed over a real Citus cluster (coordinator + 2 workers).

The service-level guarantees run on the cluster through ``NEXUS_TEST_BACKEND=citus``
(the tests marked ``cluster``, on copies of a distributed database: .ci/run runs
them there, skipping those also marked single_node). These check the distribution itself: every
table that grows is hash-distributed with shards on both workers, the hot write
functions are delegated to their key's worker, ``migrate`` distributes once and
then does nothing, and a transfer between users on different workers is one
atomic two-shard transaction under concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from devtools.citus_cluster import cluster_nodes, create_cluster_database, drop_cluster_database
from nexus import database, distribution, migrations
from nexus.server import NexusServer
from nexus.v1 import token_pb2 as pb
from nexus.v1 import token_pb2_grpc

from support.databases import users_on_both_workers
from support.rpc import SERVICE, auth
from support.servers import server_config

_numbers = itertools.count()


@pytest.fixture(scope="module")
async def cluster_db(citus_url: str) -> AsyncIterator[str]:
    """One migrated (so distributed) cluster database for the module; tests use unique ids."""
    name = f"nexus_distributed_{os.getpid()}_{next(_numbers)}"
    url = await create_cluster_database(citus_url, name)
    conn = await database.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    yield url
    await drop_cluster_database(citus_url, name)


@pytest.fixture
async def coordinator(cluster_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await database.connect(cluster_db)
    yield conn
    await conn.close()


async def worker_ports(url: str) -> set[int]:
    _, workers = await cluster_nodes(url)
    return {port for _, port in workers}


async def test_every_growing_table_is_distributed_with_shards_on_both_workers(
    coordinator: asyncpg.Connection, cluster_db: str
) -> None:
    tables = {r[0] for r in await coordinator.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables - distribution.LOCAL_TABLES == {t for t, _, _ in distribution.TABLES} | set(distribution.REFERENCE_TABLES)

    rows = await coordinator.fetch(
        """SELECT logicalrelid::text AS name, partmethod::text, colocationid,
                  column_to_column_name(logicalrelid, partkey) AS column_name
           FROM pg_dist_partition"""
    )
    by_table = {r["name"]: r for r in rows}
    for table, column, colocate_with in distribution.TABLES:
        assert table in by_table, f"{table} is not distributed"
        assert by_table[table]["partmethod"] == "h", f"{table} is not hash-distributed"
        assert by_table[table]["column_name"] == column
        group = table if colocate_with == "none" else colocate_with
        assert by_table[table]["colocationid"] == by_table[group]["colocationid"], f"{table} is not co-located with {group}"
    for table in distribution.REFERENCE_TABLES:
        assert by_table[table]["partmethod"] == "n", f"{table} is not a reference table"
    assert not distribution.LOCAL_TABLES & set(by_table)

    placements = await coordinator.fetch(
        "SELECT table_name::text AS name, array_agg(DISTINCT nodeport) AS ports FROM citus_shards GROUP BY 1"
    )
    ports = await worker_ports(cluster_db)
    # A reference table is on every worker, and on the coordinator when it is in the metadata.
    coordinator_ports = {r[0] for r in await coordinator.fetch("SELECT nodeport FROM pg_dist_node WHERE groupid = 0")}
    held = {r["name"]: set(r["ports"]) for r in placements}
    for table in distribution.REFERENCE_TABLES:
        held[table] -= coordinator_ports
    expected = {t: ports for t, _, _ in distribution.TABLES} | dict.fromkeys(distribution.REFERENCE_TABLES, ports)
    assert held == expected


async def test_hot_write_functions_are_delegated_with_their_tables(coordinator: asyncpg.Connection) -> None:
    rows = await coordinator.fetch(
        """SELECT p.proname, o.distribution_argument_index AS arg, o.colocationid,
                  p.proargnames AS names
           FROM pg_dist_object o JOIN pg_proc p ON o.classid = 'pg_proc'::regclass AND p.oid = o.objid
           WHERE o.distribution_argument_index IS NOT NULL"""
    )
    delegated = {r["proname"]: r for r in rows}
    groups = {
        r["name"]: r["colocationid"]
        for r in await coordinator.fetch("SELECT logicalrelid::text AS name, colocationid FROM pg_dist_partition")
    }
    assert set(delegated) == {f for f, _, _ in distribution.FUNCTIONS}
    for function, argument, colocate_with in distribution.FUNCTIONS:
        row = delegated[function]
        assert row["names"][row["arg"]] == argument
        assert row["colocationid"] == groups[colocate_with]
    # The hot write paths named by the issue: reactions, follows, token operations, memory writes.
    assert {"apply_reactions", "follow", "unfollow", "apply_token_operations", "create_memory",
            "update_memory", "delete_memory"} <= set(delegated)


async def test_a_second_migrate_changes_nothing(coordinator: asyncpg.Connection) -> None:
    before = await coordinator.fetchval("SELECT count(*) FROM pg_dist_object")
    assert await migrations.migrate(coordinator) == []
    assert await distribution.distribute(coordinator) == []
    assert await coordinator.fetchval("SELECT count(*) FROM pg_dist_object") == before


async def test_a_changed_function_file_is_applied_again_on_the_cluster(coordinator: asyncpg.Connection) -> None:
    """Re-applied on the coordinator, a file of db/functions/ replaces delegated functions and the
    triggers of distributed tables on the workers too, and the functions stay delegated."""
    repeatables = migrations.load_repeatables()
    position = next(i for i, r in enumerate(repeatables) if r.name == "functions/tokens.sql")
    tokens = repeatables[position]
    changed = migrations.Migration(
        tokens.name, tokens.sql.replace("'the token ledger is append-only'", "'the token ledger is append-only, always'")
    )
    assert changed.sql != tokens.sql
    try:
        assert await migrations.migrate(
            coordinator, repeatables=[*repeatables[:position], changed, *repeatables[position + 1:]]
        ) == [changed.name]
        await coordinator.fetch(
            "SELECT * FROM apply_token_operations('reapplied', '{reapplied}', '{credit}', '{NULL}', '{5}', '{r}',"
            " '{ref}', '{req-1}')"
        )
        with pytest.raises(asyncpg.PostgresError, match="append-only, always"):
            await coordinator.execute("UPDATE token_transactions SET reason = 'x' WHERE user_id = 'reapplied'")
        assert await coordinator.fetchval(
            """SELECT distribution_argument_index IS NOT NULL FROM pg_dist_object
               WHERE objid = 'apply_token_operations'::regproc"""
        )
    finally:
        assert await migrations.migrate(coordinator) == [changed.name]


async def test_a_delegated_toggle_runs_on_the_worker_that_owns_the_entry(coordinator: asyncpg.Connection) -> None:
    """The reply of a delegated call comes from the owning worker's backend."""
    entry = await coordinator.fetchval(
        "SELECT entry_id FROM create_entry('delegation-author', NULL, 'post', '', '', 'public', '{}', '{}', NULL)"
    )
    owner = await coordinator.fetchval(
        """SELECT nodeport FROM citus_shards
           WHERE shardid = get_shard_id_for_distribution_column('entries', $1::uuid)""",
        str(entry),
    )
    await coordinator.execute("SET citus.log_remote_commands = on")
    notices: list[str] = []
    coordinator.add_log_listener(lambda _conn, message: notices.append(f"{message.message} {message.detail}"))
    try:
        await coordinator.fetch(
            "SELECT * FROM apply_reactions($1::uuid, ARRAY[$1::uuid], '{toggle}', '{resonance}', '{delegation-user}')", entry
        )
    finally:
        await coordinator.execute("RESET citus.log_remote_commands")
    remote = [n for n in notices if "apply_reactions" in n]
    assert len(remote) == 1, f"not one delegated call: {notices}"
    assert f":{owner} " in remote[0], remote[0]  # "on server postgres@127.0.0.1:<port> connectionId: ..."


@contextlib.asynccontextmanager
async def balances_shards_locked_on(cluster_db: str, port: int) -> AsyncIterator[None]:
    """Every balances shard placement on the worker at ``port`` held by an open
    ACCESS EXCLUSIVE lock: any statement of another transaction that reaches one
    of them waits until this ends."""
    async with contextlib.AsyncExitStack() as stack:
        coordinator = await asyncpg.connect(cluster_db)
        stack.push_async_callback(coordinator.close)
        host, shards = "", []
        for row in await coordinator.fetch(
            "SELECT nodename, shard_name FROM citus_shards WHERE table_name = 'balances'::regclass AND nodeport = $1", port
        ):
            host = row["nodename"]
            shards.append(row["shard_name"])
        assert shards, f"no balances shard on the worker at port {port}"
        worker = await asyncpg.connect(
            distribution.node_url(cluster_db, host, port, cluster_db.rpartition("/")[2].partition("?")[0])
        )
        stack.push_async_callback(worker.close)
        await worker.execute("BEGIN")
        await worker.execute("SET LOCAL citus.enable_manual_changes_to_shards = on")  # a lock, no change
        await worker.execute(f"LOCK TABLE {', '.join(shards)} IN ACCESS EXCLUSIVE MODE")
        yield


async def test_credit_and_deduct_reach_only_the_users_worker(coordinator: asyncpg.Connection, cluster_db: str) -> None:
    """With every balances shard of the other worker locked, ledger writes of a
    user on this one still finish: none of their statements goes there. A new
    user's failed Deduct removes the balance row it created, by its key too."""
    by_worker = await users_on_both_workers(coordinator, f"reach-{os.getpid()}", 2)
    owner, other = sorted(by_worker)
    credited, refused = by_worker[owner]
    await coordinator.execute("SET statement_timeout = '10s'")  # a statement that reaches the locks fails the test
    async with balances_shards_locked_on(cluster_db, other):
        for op, user in (("credit", credited), ("deduct", credited), ("deduct", refused)):
            rows = await coordinator.fetch(
                "SELECT * FROM apply_token_operations($1, ARRAY[$1], ARRAY[$2], '{NULL}', '{5}', '{r}', '{ref}',"
                " ARRAY[$3])", user, op, f"{op}-{user}"
            )
            assert [r["error_code"] for r in rows] == ([None] if user == credited else ["NX412"]), rows
    assert await coordinator.fetchval("SELECT balance FROM balances WHERE user_id = $1", credited) == 0
    assert await coordinator.fetchval("SELECT count(*) FROM balances WHERE user_id = $1", refused) == 0


@pytest.fixture(scope="module")
async def cluster_server(cluster_db: str) -> AsyncIterator[NexusServer]:
    nexus = NexusServer(server_config(cluster_db))
    await nexus.start()
    yield nexus
    await nexus.stop(grace=0)


async def test_transfers_between_users_on_different_workers_keep_the_bank_exact(
    cluster_server: NexusServer, coordinator: asyncpg.Connection, cluster_db: str
) -> None:
    by_worker = await users_on_both_workers(coordinator, f"bank-{os.getpid()}", 3)
    assert set(by_worker) == await worker_ports(cluster_db), "the users do not span both workers"
    users = [u for group in by_worker.values() for u in group]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster_server.port}") as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        for user in users:
            await tokens.Credit(pb.CreditRequest(user_id=user, amount=100, reason="seed", reference_id="r",
                                                 request_id=f"seed-{user}"), metadata=SERVICE)

        async def transfer(n: int) -> grpc.StatusCode:
            # Mostly across workers, in both directions, so two-shard transactions
            # race on the same rows from both ends.
            payer, payee = users[n % len(users)], users[(n * 7 + 3) % len(users)]
            if payer == payee:
                payee = users[(n + 1) % len(users)]
            request = pb.TransferRequest(from_user_id=payer, to_user_id=payee, amount=1 + n % 40, reason="t",
                                         reference_id="r", request_id=f"t-{n}")
            try:
                await tokens.Transfer(request, metadata=auth(payer))
                # A retry of the same request moves nothing.
                await tokens.Transfer(request, metadata=auth(payer))
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                return error.code()

        codes = await asyncio.gather(*(transfer(n) for n in range(120)))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}, codes
    assert codes.count(grpc.StatusCode.OK) > 60

    balances = dict(await coordinator.fetch("SELECT user_id, balance FROM balances WHERE user_id = ANY ($1)", users))
    assert sum(balances.values()) == 100 * len(users), "tokens were created or lost"
    ledgers = dict(
        await coordinator.fetch(
            """SELECT user_id, sum(CASE WHEN kind IN ('credit', 'transfer_in') THEN amount ELSE -amount END)::bigint
               FROM token_transactions WHERE user_id = ANY ($1) GROUP BY user_id""",
            users,
        )
    )
    assert ledgers == balances
    legs = await coordinator.fetch(
        "SELECT request_id, count(*) AS n FROM token_transactions WHERE user_id = ANY ($1) AND kind = 'transfer_out' "
        "GROUP BY request_id HAVING count(*) > 1",
        users,
    )
    assert legs == [], "a retried transfer moved tokens twice"
