"""Operating Nexus: deadlines, database outages, graceful shutdown, slow-query
logging, metrics, per-RPC log lines and the CLI.

Every wait is bounded (``eventually`` polls with a deadline; subprocesses have
timeouts), every address is 127.0.0.1, and subprocesses are killed in finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import JWT_SECRET, SERVICE, Clients, auth, rpc_error
from conftest import test_config as nexus_config  # aliased: pytest would collect test_config
from nexus.config import Config
from nexus.embedded import EmbeddedPostgres
from nexus.server import NexusServer
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import interaction_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOGGLE_METHOD = "/nexus.v1.InteractionService/ToggleResonance"

T = TypeVar("T")


# --- helpers ------------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[T]], what: str, timeout: float = 10.0) -> T:
    """Polls ``probe`` until it returns something truthy; fails after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stub(channel: grpc.aio.Channel) -> interaction_pb2_grpc.InteractionServiceStub:
    return interaction_pb2_grpc.InteractionServiceStub(channel)


async def create_entry(channel: grpc.aio.Channel, author: str = "alice") -> str:
    request = pb.CreateEntryRequest(author_id=author, type="note", title="t", content="c")
    response = await stub(channel).CreateEntry(request, metadata=auth(author), timeout=10)
    return response.entry.entry_id


def toggle(channel: grpc.aio.Channel, user: str, entry_id: str, timeout: float) -> Awaitable[pb.ToggleResonanceResponse]:
    request = pb.ToggleResonanceRequest(user_id=user, entry_id=entry_id)
    return stub(channel).ToggleResonance(request, metadata=auth(user), timeout=timeout)


async def health_status(channel: grpc.aio.Channel) -> int | None:
    """The overall health status, or None when the server does not answer."""
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None
    return response.status


async def wait_for_health(channel: grpc.aio.Channel, status: int, timeout: float = 10.0) -> None:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    async def reached() -> bool:
        return await health_status(channel) == status

    await eventually(reached, f"health {name}", timeout)


@contextlib.asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[grpc.aio.Channel]:
    """An in-process NexusServer with ``config``, and a channel to it; stopped afterwards."""
    server = NexusServer(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        await server.stop(grace=0)


@contextlib.asynccontextmanager
async def reaction_lock(conn: asyncpg.Connection, user: str, entry_id: str) -> AsyncIterator[None]:
    """Holds an uncommitted resonance row of (user, entry): a concurrent toggle of it blocks."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            "INSERT INTO reactions (user_id, entry_id, kind) VALUES ($1, $2, 'resonance')", user, uuid.UUID(entry_id)
        )
        yield
    finally:
        await transaction.rollback()


async def nexus_toggles(conn: asyncpg.Connection, condition: str) -> int:
    """Backends of the service (application_name 'nexus') on this database running apply_reactions."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # conn may be in a transaction, which caches the view
    return await conn.fetchval(
        f"""SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'nexus' AND datname = current_database()
              AND query LIKE '%apply_reactions%' AND {condition}"""
    )


async def wait_until_toggle_blocks(conn: asyncpg.Connection) -> None:
    await eventually(lambda: nexus_toggles(conn, "wait_event_type = 'Lock'"), "the toggle to block on the row lock")


async def reaction_exists(conn: asyncpg.Connection, user: str, entry_id: str) -> bool:
    return await conn.fetchval(
        "SELECT EXISTS (SELECT FROM reactions WHERE user_id = $1 AND entry_id = $2 AND kind = 'resonance')",
        user, uuid.UUID(entry_id),
    )


def nexus_env(**values: object) -> dict[str, str]:
    """The environment without any inherited NEXUS_* setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update({k: str(v) for k, v in values.items()})
    return env


async def run_python(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
    """Runs ``python <args>`` to completion (killed after ``timeout``); returns (exit code, stdout, stderr)."""
    return await run_program(sys.executable, *args, env=env, timeout=timeout)


async def run_program(
    program: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> tuple[int, str, str]:
    """Runs ``program <args>`` to completion (killed after ``timeout``); returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        program, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Runs ``nexus <args>``; returns (exit code, stdout + stderr)."""
    code, stdout, stderr = await run_python("-m", "nexus.cli", *args, env=env, timeout=30)
    return code, stdout + stderr


@contextlib.asynccontextmanager
async def nexus_serve(env: dict[str, str], log_file: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``nexus serve`` as a subprocess (stderr to ``log_file``); killed on exit if still running."""
    with log_file.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nexus.cli", "serve", env=env, stdout=log, stderr=log
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def exit_code(proc: asyncio.subprocess.Process, timeout: float, log_file: Path) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        pytest.fail(f"nexus did not exit within {timeout} s; its log:\n{log_file.read_text()}")


async def next_status(watch: grpc.aio.UnaryStreamCall) -> int | None:
    """The next status a health Watch stream reports, or None when the stream ends."""
    try:
        message = await asyncio.wait_for(watch.read(), 10)
    except grpc.aio.AioRpcError:
        return None
    return None if message is grpc.aio.EOF else message.status


def postmaster_pid(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def process_alive(pid: int) -> bool:
    """Running, not a zombie (the postmaster is re-parented to a PID 1 that may not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def stop_leftover_postmaster(pgdata: Path) -> None:
    """Cleanup after a failed test: fast-shuts-down a postmaster still running on ``pgdata``."""
    pid = postmaster_pid(pgdata)
    if pid is None or not process_alive(pid):
        return
    os.kill(pid, signal.SIGINT)

    async def gone() -> bool:
        return not process_alive(pid)

    await eventually(gone, f"postmaster {pid} to stop", timeout=20)


async def start_embedded_elsewhere(data_dir: Path) -> str:
    """Starts the embedded PostgreSQL of ``data_dir`` from another process (as an operator
    restarting the database would); returns its URL."""
    script = (
        "import sys; from pathlib import Path; from nexus.embedded import EmbeddedPostgres; "
        "print(EmbeddedPostgres.start(Path(sys.argv[1])).url)"
    )
    code, stdout, stderr = await run_python("-c", script, str(data_dir))
    assert code == 0, stderr
    return stdout.strip().splitlines()[-1]


@pytest.fixture
async def pg_dir() -> AsyncIterator[Path]:
    """A data directory for the test's own embedded PostgreSQL, cleaned up (server stopped) afterwards.

    Not tmp_path: a pytest session starting meanwhile chmods pytest-of-<user> to 0700, which locks
    the embedded server's system user out of its own data directory."""
    path = Path(tempfile.mkdtemp(prefix="nexus-lifecycle-"))
    try:
        yield path
    finally:
        await stop_leftover_postmaster(path / "pg")
        shutil.rmtree(path, ignore_errors=True)


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
    async with running_server(nexus_config(pg.url)) as channel:
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
async def test_sigterm_drains_in_flight_calls_then_exits_zero(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    port = free_port()
    env = nexus_env(
        NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=port, NEXUS_SHUTDOWN_GRACE_S=10
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
    async with running_server(nexus_config(db_url, slow_query_warn_ms=1, slow_query_error_ms=error_ms)) as channel:
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
