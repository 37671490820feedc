"""The embedded PostgreSQL under faults: kill -9 of the database, of the server,
a stale postmaster.pid, two servers on one data directory, SIGTERM with the
database already dead, and a second server on a port in use.

Each test runs its own embedded PostgreSQL in its own data directory (``pg_dir``)
and real ``nexus serve`` processes; every wait is bounded (``eventually``,
``next_status``, ``exit_code``) and processes are killed in finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus.config import Config
from nexus.embedded import EmbeddedPostgres
from nexus.server import NexusServer
from nexus.v1 import interaction_pb2 as pb

from support.processes import (
    exit_code,
    kill_postmaster,
    nexus_env,
    nexus_serve,
    postmaster_pid,
    process_alive,
    run_cli,
    start_embedded_elsewhere,
    wait_until_gone,
)
from support.rpc import JWT_SECRET, SERVICE, create_entry, stub, toggle
from support.servers import (
    NOT_SERVING,
    SERVING,
    free_port,
    health_status,
    next_status,
    running_server,
    server_config,
    wait_for_health,
)
from support.waiting import eventually

RECOVERY_BOUND_S = 15.0  # kill -9 of the postmaster → SERVING again; about 3 s when idle


def cluster_processes(pgdata: Path) -> list[psutil.Process]:
    """Live processes of pgdata's PostgreSQL cluster (the postmaster works in its
    data directory and every backend inherits that)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and process.cwd() == str(pgdata):
                found.append(process)
    return found


async def wait_until_no_cluster_processes(pgdata: Path) -> None:
    async def none_left() -> bool:
        return not await asyncio.to_thread(cluster_processes, pgdata)

    await eventually(none_left, f"no PostgreSQL process of {pgdata} left", timeout=20)


async def existing_entries(channel: grpc.aio.Channel, entry_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(entry_ids), 500):
        request = pb.GetEntriesRequest(entry_ids=entry_ids[start : start + 500])
        response = await stub(channel).GetEntries(request, metadata=SERVICE, timeout=10)
        found.update(entry.entry_id for entry in response.entries)
    return found


def serve_env(data_dir: Path, port: int, **values: object) -> dict[str, str]:
    return nexus_env(NEXUS_DATA_DIR=data_dir, NEXUS_PORT=port, NEXUS_JWT_SECRET=JWT_SECRET, **values)


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], log_file: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, grpc.aio.Channel]]:
    """``nexus serve`` with ``env``, once it answers SERVING, and a channel to it."""
    async with (
        nexus_serve(env, log_file) as proc,
        grpc.aio.insecure_channel(f"127.0.0.1:{env['NEXUS_PORT']}") as channel,
    ):
        await wait_for_health(channel, SERVING, timeout=60)
        yield proc, channel


# --- kill -9 of the database ------------------------------------------------------


async def test_killed_embedded_postmaster_is_restarted_and_acknowledged_writes_survive(pg_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    config = Config(data_dir=pg_dir, port=0, jwt_secret=JWT_SECRET, log_level="warning")
    async with running_server(config) as channel:
        resonated = await create_entry(channel)
        assert (await toggle(channel, "bob", resonated, timeout=5)).resonated
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert await next_status(watch) == SERVING

        acknowledged: list[str] = []
        stop_writing = asyncio.Event()

        async def write_until_stopped() -> None:
            while not stop_writing.is_set():
                try:
                    acknowledged.append(await create_entry(channel))
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)  # the database is down: no busy loop

        async def written(count: int) -> bool:
            return len(acknowledged) >= count

        writer = asyncio.create_task(write_until_stopped())
        try:
            await eventually(lambda: written(5), "writes before the kill")
            killed_at = loop.time()
            killed = kill_postmaster(pg_dir / "pg")

            assert await next_status(watch) == NOT_SERVING
            assert await next_status(watch) == SERVING
            recovery_s = loop.time() - killed_at
            after_recovery = len(acknowledged)
            await eventually(lambda: written(after_recovery + 5), "writes after the restart")
        finally:
            stop_writing.set()
            await writer
            watch.cancel()

        assert recovery_s < RECOVERY_BOUND_S
        restarted = postmaster_pid(pg_dir / "pg")
        assert restarted is not None and restarted != killed and process_alive(restarted)
        assert await existing_entries(channel, acknowledged) == set(acknowledged)
        # Toggling off proves the resonance acknowledged before the kill is still there.
        assert not (await toggle(channel, "bob", resonated, timeout=5)).resonated


async def test_backend_orphaned_by_the_killed_postmaster_is_killed_before_the_restart(pg_dir: Path) -> None:
    """A backend busy computing never notices its postmaster died and could still write
    WAL: a new postmaster must not start beside it."""
    server = NexusServer(Config(data_dir=pg_dir, port=0, jwt_secret=JWT_SECRET, log_level="warning"))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            conn = await asyncpg.connect(server.database_url, timeout=10)
            observer = await asyncpg.connect(server.database_url, timeout=10)
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            busy = asyncio.ensure_future(conn.fetchval("SELECT count(*) FROM generate_series(1, 100000000000)"))
            try:

                async def computing() -> bool:
                    state = "SELECT state FROM pg_stat_activity WHERE pid = $1"
                    return await observer.fetchval(state, backend) == "active"

                await eventually(computing, "the backend to be busy")
                postmaster = kill_postmaster(pg_dir / "pg")
                await wait_until_gone(postmaster, "the postmaster to die", timeout=5)
                assert process_alive(backend), "the busy backend exited with its postmaster"

                await wait_for_health(channel, NOT_SERVING)
                await wait_for_health(channel, SERVING, timeout=RECOVERY_BOUND_S)
                assert not process_alive(backend)
                assert await create_entry(channel)
            finally:
                busy.cancel()
                conn.terminate()
                observer.terminate()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(backend, signal.SIGKILL)
    finally:
        await server.stop(grace=0)


async def test_stale_postmaster_pid_naming_a_live_process_is_cleared(pg_dir: Path) -> None:
    """After a crash the pid in postmaster.pid (and the socket's lock file) may belong
    to another process by now: a start must see through it, not take it for the server."""
    url = await start_embedded_elsewhere(pg_dir)  # its process has exited: the database has no owner
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
    finally:
        await conn.close()
    pgdata = pg_dir / "pg"
    crashed = kill_postmaster(pgdata)
    await wait_until_no_cluster_processes(pgdata)

    impostor = await asyncio.create_subprocess_exec("sleep", "120")
    try:
        lock_files = [pgdata / "postmaster.pid", *pgdata.glob(".s.PGSQL.*.lock")]
        assert len(lock_files) == 2, lock_files
        for lock_file in lock_files:
            lines = lock_file.read_text().splitlines(keepends=True)
            assert int(lines[0]) == crashed
            lock_file.write_text(f"{impostor.pid}\n" + "".join(lines[1:]))

        pg = await asyncio.to_thread(EmbeddedPostgres.start, pg_dir)
        try:
            assert pg.owner
            assert postmaster_pid(pgdata) not in (None, crashed, impostor.pid)
            conn = await asyncpg.connect(pg.url, timeout=10)
            try:
                assert await conn.fetchval("SELECT n FROM kept") == 42
            finally:
                await conn.close()
        finally:
            await asyncio.to_thread(pg.stop)
        assert impostor.returncode is None, "the impostor process was killed"
    finally:
        impostor.kill()
        await impostor.wait()
    await wait_until_no_cluster_processes(pgdata)


# --- ownership ------------------------------------------------------------------------


async def test_server_after_a_killed_server_adopts_then_stops_the_database(pg_dir: Path, tmp_path: Path) -> None:
    pgdata = pg_dir / "pg"
    async with serving(serve_env(pg_dir, free_port()), tmp_path / "first.log") as (first, channel):
        entry_id = await create_entry(channel)
        first.kill()
        await first.wait()
    orphaned = postmaster_pid(pgdata)
    assert orphaned is not None and process_alive(orphaned), "kill -9 of the server stopped its database"

    log_file = tmp_path / "second.log"
    async with serving(serve_env(pg_dir, free_port()), log_file) as (second, channel):
        assert postmaster_pid(pgdata) == orphaned, "the running database was restarted instead of adopted"
        assert "owner=True" in log_file.read_text(), "the adopting server does not own the database"
        assert await existing_entries(channel, [entry_id]) == {entry_id}
        # A one-shot command on the same data directory uses the database and leaves it to its owner.
        code, output = await run_cli("reconcile", env=serve_env(pg_dir, free_port()))
        assert code == 0, output
        assert postmaster_pid(pgdata) == orphaned and process_alive(orphaned), "a one-shot command stopped the database"
        assert await health_status(channel) == SERVING
        second.send_signal(signal.SIGTERM)
        assert await exit_code(second, 30, log_file) == 0
    assert not process_alive(orphaned)
    await wait_until_no_cluster_processes(pgdata)


async def test_second_server_on_a_data_dir_uses_the_database_without_owning_it(pg_dir: Path, tmp_path: Path) -> None:
    pgdata = pg_dir / "pg"
    owner_log, sharer_log = tmp_path / "owner.log", tmp_path / "sharer.log"
    async with serving(serve_env(pg_dir, free_port()), owner_log) as (owner, owner_channel):
        postmaster = postmaster_pid(pgdata)
        async with serving(serve_env(pg_dir, free_port()), sharer_log) as (sharer, sharer_channel):
            entry_id = await create_entry(sharer_channel)
            sharer.send_signal(signal.SIGTERM)
            assert await exit_code(sharer, 30, sharer_log) == 0

        assert postmaster_pid(pgdata) == postmaster and postmaster is not None and process_alive(postmaster)
        assert await health_status(owner_channel) == SERVING
        assert await existing_entries(owner_channel, [entry_id]) == {entry_id}
        owner.send_signal(signal.SIGTERM)
        assert await exit_code(owner, 30, owner_log) == 0
    assert not process_alive(postmaster)
    await wait_until_no_cluster_processes(pgdata)


async def test_an_owner_stopping_first_leaves_the_database_to_the_server_still_using_it(
    pg_dir: Path, tmp_path: Path
) -> None:
    pgdata = pg_dir / "pg"
    owner_log, sharer_log = tmp_path / "owner.log", tmp_path / "sharer.log"
    async with serving(serve_env(pg_dir, free_port()), owner_log) as (owner, _):
        postmaster = postmaster_pid(pgdata)
        async with serving(serve_env(pg_dir, free_port()), sharer_log) as (sharer, channel):
            owner.send_signal(signal.SIGTERM)
            assert await exit_code(owner, 30, owner_log) == 0
            assert "in use by another process" in owner_log.read_text()
            assert postmaster_pid(pgdata) == postmaster and postmaster is not None and process_alive(postmaster)
            assert await health_status(channel) == SERVING
            await create_entry(channel)  # no outage: the database never went down

            async def owns_it() -> bool:
                return "event=embedded_postgres_owned" in sharer_log.read_text()

            await eventually(owns_it, "the remaining server to take ownership")
            sharer.send_signal(signal.SIGTERM)
            assert await exit_code(sharer, 30, sharer_log) == 0
    assert not process_alive(postmaster)
    await wait_until_no_cluster_processes(pgdata)


async def test_sharing_server_takes_over_when_the_owner_is_killed(pg_dir: Path, tmp_path: Path) -> None:
    """The owner dies, then the database: the server left restarts it (it owns it now) and stops it at SIGTERM."""
    pgdata = pg_dir / "pg"
    sharer_log = tmp_path / "sharer.log"
    async with serving(serve_env(pg_dir, free_port()), tmp_path / "owner.log") as (owner, _):
        async with serving(serve_env(pg_dir, free_port()), sharer_log) as (sharer, channel):
            entry_id = await create_entry(channel)
            owner.kill()
            await owner.wait()
            killed = kill_postmaster(pgdata)

            await wait_for_health(channel, NOT_SERVING)
            await wait_for_health(channel, SERVING, timeout=RECOVERY_BOUND_S)
            assert postmaster_pid(pgdata) != killed
            assert await existing_entries(channel, [entry_id]) == {entry_id}
            await create_entry(channel)
            sharer.send_signal(signal.SIGTERM)
            assert await exit_code(sharer, 30, sharer_log) == 0
    await wait_until_no_cluster_processes(pgdata)


# --- shutdown -------------------------------------------------------------------------


async def test_sigterm_with_the_embedded_database_already_dead_exits_zero(pg_dir: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "nexus.log"
    async with serving(serve_env(pg_dir, free_port()), log_file) as (proc, _):
        postmaster = kill_postmaster(pg_dir / "pg")
        await wait_until_gone(postmaster, "the postmaster to die", timeout=5)
        proc.send_signal(signal.SIGTERM)  # at once: before the health probe notices and restarts it
        assert await exit_code(proc, 30, log_file) == 0
    # (asyncpg's pool may log a traceback when its connections die: not part of the shutdown.)
    shutdown_log = log_file.read_text().split("event=shutdown_requested", 1)[1]
    assert "Traceback" not in shutdown_log, shutdown_log
    # Usually the shutdown finds the database down. If the health probe began a
    # restart first (a loaded machine), the shutdown waits for it and stops the
    # restarted database. Either way the database is dealt with once.
    outcomes = [e for e in ("embedded_postgres_already_down", "embedded_postgres_stopped") if f"event={e}" in shutdown_log]
    assert len(outcomes) == 1 and shutdown_log.count(f"event={outcomes[0]}") == 1, shutdown_log
    if outcomes == ["embedded_postgres_stopped"]:  # then it was a restarted database
        after_down = log_file.read_text().partition("event=embedded_postgres_down")[2]
        assert "event=embedded_postgres_started" in after_down, log_file.read_text()
    await wait_until_no_cluster_processes(pg_dir / "pg")


# --- port -----------------------------------------------------------------------------


async def test_second_serve_on_a_port_in_use_fails_with_a_clear_error(db_url: str) -> None:
    port = free_port()
    async with running_server(server_config(db_url, port=port)) as channel:
        env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=port)
        code, output = await run_cli("serve", env=env)
        assert code == 1, output
        assert output.strip().splitlines()[-1] == f"nexus: port {port} on 127.0.0.1 is in use", output
        assert "Traceback" not in output, output
        assert await health_status(channel) == SERVING


async def test_servers_share_a_port_with_reuse_port(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "second.log"
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=port, NEXUS_REUSE_PORT="true")
    async with running_server(server_config(db_url, port=port, reuse_port=True)), nexus_serve(env, log_file) as second:

        async def second_serving() -> bool:
            return second.returncode is not None or "event=serving" in log_file.read_text()

        await eventually(second_serving, "the second server to start", timeout=60)
        assert second.returncode is None, log_file.read_text()
        second.send_signal(signal.SIGTERM)
        assert await exit_code(second, 30, log_file) == 0
