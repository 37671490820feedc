"""Operating Nexus: deadlines, database outages, graceful shutdown, slow-query
logging, metrics, per-RPC log lines and the CLI.

Every wait is bounded (``eventually`` polls with a deadline; subprocesses have
timeouts), every address is 127.0.0.1, and subprocesses are killed in finally.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus.embedded import EmbeddedPostgres
from nexus.server import NexusServer
from nexus.v1 import interaction_pb2 as pb

from support.databases import nexus_toggles, reaction_exists, reaction_lock, wait_until_toggle_blocks
from support.processes import exit_code, nexus_env, nexus_serve, postmaster_pid, process_alive, run_cli, start_embedded_elsewhere
from support.rpc import JWT_SECRET, SERVICE, Clients, create_entry, rpc_error, stub, toggle
from support.servers import NOT_SERVING, SERVING, free_port, next_status, running_server, server_config, wait_for_health
from support.waiting import eventually

TOGGLE_METHOD = "/nexus.v1.InteractionService/ToggleResonance"


# --- deadlines ----------------------------------------------------------------


async def test_expired_deadline_leaves_nothing_running_and_nothing_committed(
    clients: Clients, db: asyncpg.Connection
) -> None:
    entry_id = await create_entry(clients.channel)
    async with reaction_lock(db, "bob", entry_id):
        error = await rpc_error(toggle(clients.channel, "bob", entry_id, timeout=0.5))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        async def nothing_running() -> bool:
            return await nexus_toggles(db, "state <> 'idle'") == 0

        # Well under the 30 s statement_timeout ceiling: only a cancel sent at the deadline gets here.
        await eventually(nothing_running, "the expired toggle to be cancelled in the database", timeout=5)
    assert not await reaction_exists(db, "bob", entry_id)


# --- database outage ------------------------------------------------------------


async def test_embedded_postgres_restarts_in_the_same_process(pg_dir: Path) -> None:
    pg = await asyncio.to_thread(EmbeddedPostgres.start, pg_dir)
    await asyncio.to_thread(pg.stop)

    restarted = await asyncio.to_thread(EmbeddedPostgres.start, pg_dir)
    assert postmaster_pid(restarted.pgdata) is not None, "start() after stop() did not start the server"
    conn = await asyncpg.connect(restarted.url, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_database_outage_gives_unavailable_and_recovers_without_restart(pg_dir: Path) -> None:
    pg = await asyncio.to_thread(EmbeddedPostgres.start, pg_dir)
    async with running_server(server_config(pg.url)) as channel:
        entry_id = await create_entry(channel)
        get_entry = pb.GetEntriesRequest(entry_ids=[entry_id])
        await wait_for_health(channel, SERVING)

        await asyncio.to_thread(pg.stop)
        calls = [
            lambda: stub(channel).GetEntries(get_entry, metadata=SERVICE, timeout=5),
            lambda: toggle(channel, "bob", entry_id, timeout=5),
            lambda: create_entry(channel),
        ]
        for call in calls:
            assert (await rpc_error(call())).code() == grpc.StatusCode.UNAVAILABLE
        await wait_for_health(channel, NOT_SERVING)

        # Restarted from another process, as the operator of an external database would.
        assert await start_embedded_elsewhere(pg_dir) == pg.url
        await wait_for_health(channel, SERVING)
        response = await stub(channel).GetEntries(get_entry, metadata=SERVICE, timeout=5)
        assert [e.entry_id for e in response.entries] == [entry_id]
        assert (await toggle(channel, "bob", entry_id, timeout=5)).resonated


# --- graceful shutdown ------------------------------------------------------------


ROW_LOCK_ON_ONE_SERVER = pytest.mark.single_node(
    "waits for the toggle to block on a row lock in the one server's pg_stat_activity; on the cluster it blocks "
    "on the entry's worker"
)


@ROW_LOCK_ON_ONE_SERVER
@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_in_flight_calls_then_exits_zero(
    db_url: str, db: asyncpg.Connection, tmp_path: Path, workers: int
) -> None:
    """With workers, the parent forwards SIGTERM and waits while the call's worker drains it."""
    port = free_port()
    env = nexus_env(
        NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=port, NEXUS_SHUTDOWN_GRACE_S=10,
        NEXUS_WORKERS=workers,
    )
    log_file = tmp_path / "nexus.log"
    async with nexus_serve(env, log_file) as proc, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_for_health(channel, SERVING, timeout=30)
        entry_id = await create_entry(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert await next_status(watch) == SERVING

        async with reaction_lock(db, "bob", entry_id):
            in_flight = asyncio.ensure_future(toggle(channel, "bob", entry_id, timeout=30))
            await wait_until_toggle_blocks(db)
            proc.send_signal(signal.SIGTERM)
            assert await next_status(watch) in (NOT_SERVING, None)
            watch.cancel()
            assert proc.returncode is None and not in_flight.done()

        response = await asyncio.wait_for(in_flight, 10)
        assert response.resonated
        assert await exit_code(proc, 15, log_file) == 0
    assert await reaction_exists(db, "bob", entry_id)


async def test_sigint_stops_the_embedded_database_cleanly(pg_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "nexus.log"
    async with (
        nexus_serve(nexus_env(NEXUS_DATA_DIR=pg_dir, NEXUS_PORT=port), log_file) as proc,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        await wait_for_health(channel, SERVING, timeout=60)
        pid = postmaster_pid(pg_dir / "pg")
        assert pid is not None and process_alive(pid)

        proc.send_signal(signal.SIGINT)
        assert await exit_code(proc, 30, log_file) == 0
        assert not (pg_dir / "pg" / "postmaster.pid").exists()
        assert not process_alive(pid)


# --- observability ------------------------------------------------------------------


@ROW_LOCK_ON_ONE_SERVER
@pytest.mark.parametrize(("error_ms", "level"), [(60_000, logging.WARNING), (20, logging.ERROR)])
async def test_slow_database_calls_are_logged(
    db_url: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, error_ms: int, level: int
) -> None:
    caplog.set_level(logging.WARNING, logger="nexus.database")
    async with running_server(server_config(db_url, slow_query_warn_ms=1, slow_query_error_ms=error_ms)) as channel:
        entry_id = await create_entry(channel)
        async with reaction_lock(db, "bob", entry_id):
            in_flight = asyncio.ensure_future(toggle(channel, "bob", entry_id, timeout=10))
            await wait_until_toggle_blocks(db)
            await asyncio.sleep(0.1)  # not an assertion: keeps the blocked call over both thresholds
        await in_flight

    slow = [r for r in caplog.records if r.name == "nexus.database" and "event=slow_query" in r.getMessage()]
    toggles = [r for r in slow if "query=apply_reactions" in r.getMessage()]
    assert [r.levelno for r in toggles] == [level], [r.getMessage() for r in slow]
    assert re.search(r"duration_ms=\d+\.\d", toggles[0].getMessage())


async def test_one_structured_log_line_per_rpc(clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nexus.rpc")
    await create_entry(clients.channel, "alice")
    error = await rpc_error(toggle(clients.channel, "alice", "not-a-uuid", timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    def lines(method: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "nexus.rpc" and f"method={method} " in r.getMessage()]

    async def toggle_logged() -> bool:  # the failing call's line may land just after the client saw the status
        return bool(lines(TOGGLE_METHOD))

    await eventually(toggle_logged, "the ToggleResonance log line", timeout=5)
    pattern = r"event=rpc method={} code={} duration_ms=\d+\.\d+ user=alice service=False"
    create_lines = lines("/nexus.v1.InteractionService/CreateEntry")
    assert len(create_lines) == 1 and re.fullmatch(
        pattern.format(re.escape("/nexus.v1.InteractionService/CreateEntry"), "OK"), create_lines[0]
    ), create_lines
    toggle_lines = lines(TOGGLE_METHOD)
    assert len(toggle_lines) == 1 and re.fullmatch(
        pattern.format(re.escape(TOGGLE_METHOD), "INVALID_ARGUMENT"), toggle_lines[0]
    ), toggle_lines


# --- CLI ----------------------------------------------------------------------------


async def test_cli_token_is_accepted_by_the_server(clients: Clients) -> None:
    code, output = await run_cli("token", "--sub", "alice", env=nexus_env(NEXUS_JWT_SECRET=JWT_SECRET))
    assert code == 0, output
    token = output.strip().splitlines()[-1]
    assert token.count(".") == 2, output

    request = pb.CreateEntryRequest(author_id="alice", type="note", title="t", content="c")
    response = await clients.interactions.CreateEntry(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    assert response.entry.author_id == "alice"


async def test_cli_health_exit_codes(server: NexusServer) -> None:
    env = nexus_env()
    code, output = await run_cli("health", "--port", str(server.port), env=env)
    assert code == 0, output
    assert "SERVING" in output

    code, output = await run_cli("health", "--port", str(free_port()), env=env)
    assert code == 1, output
