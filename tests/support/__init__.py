"""Helpers the tests share: configuration, credentials, clients, rich errors,
scratch databases, servers and subprocesses, bounded waiting. Plain functions
and classes, no fixtures (those are in conftest.py), and no name starting with
``test`` for pytest to collect."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import signal
import socket
import struct
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from devtools.citus_cluster import copy_cluster_database, drop_cluster_database
from nexus import database, migrations
from nexus.auth import mint_token
from nexus.config import Config
from nexus.maintenance import Maintenance
from nexus.pagination import PageTokens
from nexus.server import NexusServer
from nexus.v1 import follow_pb2_grpc, interaction_pb2_grpc, memory_pb2, memory_pb2_grpc, token_pb2_grpc
from nexus.v1 import interaction_pb2 as pb

JWT_SECRET = "test-secret-" + "x" * 32
# The page tokens of a server configured with JWT_SECRET, to forge odd ones,
# and positions such a token may hold that the service never issues.
SERVER_TOKENS = PageTokens(JWT_SECRET.encode())
SIGNED_ODD_POSITIONS = {
    "int64-overflow": [2**63],
    "int64-underflow": [-(2**63) - 1],
    "beyond-int32": [2**40, 1],
    "huge": [2**70],
    "negative": [-1],
    "nested": [[1]],
    "infinite": [math.inf],
}


def with_database(url: str, name: str) -> str:
    """The same server's URL for another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def server_config(database_url: str, **overrides: object) -> Config:
    """A test server's configuration: port 0, the test JWT secret, a small pool, quiet logs."""
    values: dict[str, object] = dict(
        database_url=database_url, port=0, jwt_secret=JWT_SECRET, pool_min_size=2, pool_max_size=16, log_level="warning"
    )
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


def token(subject: str, *, service: bool = False, ttl_s: int = 3600) -> str:
    return mint_token(JWT_SECRET, subject, service=service, ttl_s=ttl_s)


def auth(subject: str, *, service: bool = False) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token for ``subject``."""
    return (("authorization", f"Bearer {token(subject, service=service)}"),)


SERVICE = auth("backend", service=True)


@dataclass
class Clients:
    """The stubs of every Nexus service over one channel."""

    channel: grpc.aio.Channel

    @property
    def interactions(self) -> interaction_pb2_grpc.InteractionServiceStub:
        return interaction_pb2_grpc.InteractionServiceStub(self.channel)

    @property
    def follows(self) -> follow_pb2_grpc.FollowServiceStub:
        return follow_pb2_grpc.FollowServiceStub(self.channel)

    @property
    def tokens(self) -> token_pb2_grpc.TokenServiceStub:
        return token_pb2_grpc.TokenServiceStub(self.channel)

    @property
    def memories(self) -> memory_pb2_grpc.MemoryServiceStub:
        return memory_pb2_grpc.MemoryServiceStub(self.channel)


def new_uuid() -> str:
    return str(uuid.uuid4())


# --- rich errors ----------------------------------------------------------------

_Detail = TypeVar("_Detail", bound=Message)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail; returns its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def error_details(error: grpc.aio.AioRpcError, detail_type: type[_Detail]) -> list[_Detail]:
    """The details of one type (BadRequest, PreconditionFailure, ...) in the error's
    google.rpc.Status trailer, which every Nexus error carries."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details"
    found = []
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            unpacked = detail_type()
            detail.Unpack(unpacked)
            found.append(unpacked)
    return found


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of the BadRequest detail of an INVALID_ARGUMENT error."""
    return [v.field for d in error_details(error, error_details_pb2.BadRequest) for v in d.field_violations]


def precondition_types(error: grpc.aio.AioRpcError) -> list[str]:
    """The violation types (INSUFFICIENT_FUNDS, ...) of a FAILED_PRECONDITION error."""
    return [v.type for d in error_details(error, error_details_pb2.PreconditionFailure) for v in d.violations]


# --- paged lists ----------------------------------------------------------------

class _Paged(Protocol):
    next_page_token: str


_Page = TypeVar("_Page", bound=_Paged)
_Item = TypeVar("_Item")


async def all_pages(fetch: Callable[[str], Awaitable[_Page]], items: Callable[[_Page], Iterable[_Item]]) -> list[list[_Item]]:
    """The items of every page of a list, page by page: ``fetch(page_token)`` from the
    first page ("") on, following next_page_token until a page has none."""
    pages: list[list[_Item]] = []
    token = ""
    while True:
        page = await fetch(token)
        pages.append(list(items(page)))
        token = page.next_page_token
        if not token:
            return pages


# --- databases ------------------------------------------------------------------

_scratch_numbers = itertools.count()


@contextlib.asynccontextmanager
async def scratch_database(
    admin_url: str, prefix: str, *, template: str | None = None, embedding_dim: int | None = None
) -> AsyncIterator[str]:
    """A database of its own on ``admin_url``'s server, dropped afterwards; yields its URL.

    A copy of ``template``, or else empty; migrated first when ``embedding_dim``
    is given (for tests that need another dimension than the template's)."""
    name = f"{prefix}_{os.getpid()}_{next(_scratch_numbers)}"
    await _admin(admin_url, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        url = with_database(admin_url, name)
        if embedding_dim is not None:
            conn = await database.connect(url)
            try:
                await migrations.migrate(conn, embedding_dim=embedding_dim)
            finally:
                await conn.close()
        yield url
    finally:
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(admin_url: str, statement: str) -> None:
    """One statement on a connection of its own: none is held while the test runs."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


# --- memories and vectors ------------------------------------------------------


def f32(values: Sequence[float]) -> list[float]:
    """The values as the float32s they become on the wire (repeated float)."""
    return list(struct.unpack(f"{len(values)}f", struct.pack(f"{len(values)}f", *values)))


def random_vector(
    rng: random.Random,
    dim: int = migrations.DEFAULT_EMBEDDING_DIM,
    center: Sequence[float] | None = None,
    spread: float = 1.0,
) -> list[float]:
    """A float32 vector spread around ``center`` (the origin by default)."""
    center = center or [0.0] * dim
    return f32([c + rng.gauss(0, spread) for c in center])


def distance(a: Sequence[float], b: Sequence[float], metric: int) -> float:
    if metric == memory_pb2.DISTANCE_METRIC_L2:
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def create(
    stub: memory_pb2_grpc.MemoryServiceStub, user: str, content: str, embedding: Sequence[float] = (), **fields: Any
) -> memory_pb2.Memory:
    request = memory_pb2.CreateMemoryRequest(user_id=user, content=content, embedding=embedding, **fields)
    return (await stub.CreateMemory(request, metadata=auth(user))).memory


@contextlib.asynccontextmanager
async def maintenance_runner(db_url: str, **overrides: Any) -> AsyncIterator[Maintenance]:
    """A Maintenance on its own pool (no background loop), configured as
    server_config(db_url, **overrides)."""
    db = await database.Database.open(
        db_url, min_size=1, max_size=2, statement_timeout_ms=30_000, slow_warn_ms=10_000, slow_error_ms=20_000
    )
    try:
        yield Maintenance(db, server_config(db_url, **overrides))
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def serving(
    url: str, build_indexes: Sequence[str] = (), **overrides: Any
) -> AsyncIterator[memory_pb2_grpc.MemoryServiceStub]:
    """A NexusServer of its own over url, and a MemoryService stub for it.
    With build_indexes, its maintenance first runs the vector-index job, which
    must build exactly those users' indexes."""
    server = NexusServer(server_config(url, **overrides))
    await server.start()
    try:
        if build_indexes:
            assert server.maintenance is not None
            assert await server.maintenance.maintain_vector_indexes() == list(build_indexes)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield memory_pb2_grpc.MemoryServiceStub(channel)
    finally:
        await server.stop(grace=0)


# --- servers, processes and waiting --------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

T = TypeVar("T")


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


async def connect_when_back(db_url: str, timeout: float = 30) -> asyncpg.Connection:
    """A new connection, once PostgreSQL accepts them again (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await asyncpg.connect(db_url)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


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


async def wait_until_gone(pid: int, what: str, timeout: float) -> None:
    async def gone() -> bool:
        return not process_alive(pid)

    await eventually(gone, what, timeout)


def kill_postmaster(pgdata: Path) -> int:
    """Crashes the PostgreSQL of ``pgdata``: SIGKILL to its postmaster; returns the pid."""
    pid = postmaster_pid(pgdata)
    assert pid is not None, f"no postmaster on {pgdata}"
    os.kill(pid, signal.SIGKILL)
    return pid


async def stop_leftover_postmaster(pgdata: Path) -> None:
    """Cleanup after a failed test: fast-shuts-down a postmaster still running on ``pgdata``."""
    pid = postmaster_pid(pgdata)
    if pid is None or not process_alive(pid):
        return
    os.kill(pid, signal.SIGINT)
    await wait_until_gone(pid, f"postmaster {pid} to stop", timeout=20)


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


NEXUS = str(Path(sys.executable).with_name("nexus"))  # the installed command, beside the interpreter


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Both streams, for failure messages."""
        return f"exit code {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"

    @property
    def error_line(self) -> str:
        """The one line a failing command prints on stderr (fails the test if there are more)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.stderr}"
        return lines[0]


async def run_nexus(*args: str, env: dict[str, str], timeout: float = 60.0) -> Run:
    """Runs `nexus <args>` (the installed command) to completion (killed after `timeout`)."""
    return Run(*await run_program(NEXUS, *args, env=env, timeout=timeout))


# NEXUS_TEST_BACKEND=citus: the tests on the database backend run against a Citus
# cluster (see conftest.py); databases are then created on every node.
ON_CITUS = os.environ.get("NEXUS_TEST_BACKEND", "postgres") == "citus"


async def create_test_database(admin_url: str, template: str, name: str) -> str:
    """A copy of the migrated template (on every node of a cluster); its URL."""
    if ON_CITUS:
        return await copy_cluster_database(admin_url, template, name)
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return with_database(admin_url, name)


async def drop_test_database(admin_url: str, name: str) -> None:
    if ON_CITUS:
        await drop_cluster_database(admin_url, name)
        return
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def backend_database(admin_url: str, template: str, prefix: str) -> AsyncIterator[str]:
    """A copy of the migrated template on the backend under test, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = await create_test_database(admin_url, template, name)
    try:
        yield url
    finally:
        await drop_test_database(admin_url, name)
