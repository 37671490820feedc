"""``nexus bench``: load figures for a Nexus server, measured in one run.

By default the bench starts its own server on 127.0.0.1, on a fresh embedded
PostgreSQL in a temporary directory that it removes afterwards: bench data
never lands in a database the bench did not create. ``--disposable-database``
benches the configured server and writes into the configured database
instead, which the flag declares disposable.

Ceilings first, then the service, so the ratios compare like with like on a
noisy shared machine:
- transport ceiling: the standard health Check RPC (no database work);
- database ceiling: pgbench calling the same stored functions the RPCs call.
Then the invariants are checked (reconcile must find no drift).
Every scenario is bounded by --duration. A bench that cannot reach its
server, or any of whose calls fails, stops with one line saying so and prints
no further figure or ratio: a ratio of failures is not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus import database, embedded
from nexus.auth import mint_token
from nexus.client import ClientError, database_url, describe_rpc_error, server_address, service_metadata
from nexus.config import Config, env_var
from nexus.reconcile import reconcile
from nexus.v1 import follow_pb2, follow_pb2_grpc, interaction_pb2, interaction_pb2_grpc, token_pb2, token_pb2_grpc

BENCH_ENTRIES = 100_000
BENCH_USERS = 1_000_000
BENCH_PAYERS = 10_000

# Entries whose ids pgbench can compute (md5('bench-entry-' || n)::uuid), and
# funded payers (through the ledger, so balances equal it).
SETUP_SQL = f"""
INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type, title,
                     content, privacy, tags, metadata)
SELECT id, 'bench-author', id, 0, 0, '{{}}', 'post', 'bench', 'bench entry', 'public', '{{}}', '{{}}'
FROM generate_series(1, {BENCH_ENTRIES}) n, CAST(md5('bench-entry-' || n) AS uuid) AS id
ON CONFLICT DO NOTHING;
SELECT count(*) FROM apply_token_operations(
    array_fill('credit'::text, ARRAY[{BENCH_PAYERS}]),
    (SELECT array_agg('bench-payer-' || n) FROM generate_series(1, {BENCH_PAYERS}) n),
    array_fill(NULL::text, ARRAY[{BENCH_PAYERS}]), array_fill(1000000000000::bigint, ARRAY[{BENCH_PAYERS}]),
    array_fill('bench funding'::text, ARRAY[{BENCH_PAYERS}]), array_fill(''::text, ARRAY[{BENCH_PAYERS}]),
    array_fill('bench-funding'::text, ARRAY[{BENCH_PAYERS}]));
ANALYZE;
"""

_ONE_TOGGLE = "SELECT * FROM apply_reactions(ARRAY['toggle'], ARRAY['resonance']::reaction_kind[], ARRAY['bench-user-' || :user], ARRAY[CAST(md5('bench-entry-' || {entry}) AS uuid)]);"  # noqa: E501
_ONE_TRANSFER = "SELECT count(*) FROM apply_token_operations(ARRAY['transfer'], ARRAY['bench-payer-' || :payer], ARRAY[{payee}], ARRAY[1::bigint], ARRAY['bench'], ARRAY[''], ARRAY[md5(random()::text)]);"  # noqa: E501

PGBENCH_SCRIPTS = {
    "toggle_uniform": f"\\set entry random(1, {BENCH_ENTRIES})\n\\set user random(1, {BENCH_USERS})\n"
    + _ONE_TOGGLE.format(entry=":entry"),
    "toggle_hot": f"\\set user random(1, {BENCH_USERS})\n" + _ONE_TOGGLE.format(entry="1"),
    # 16 writes in one call: what the service's group commit sends under load.
    "toggle_uniform_batch16": f"""SELECT count(*) FROM apply_reactions(
    array_fill('toggle'::text, ARRAY[16]), array_fill('resonance'::reaction_kind, ARRAY[16]),
    (SELECT array_agg('bench-user-' || (1 + floor(random() * {BENCH_USERS}))::int) FROM generate_series(1, 16)),
    (SELECT array_agg(CAST(md5('bench-entry-' || (1 + floor(random() * {BENCH_ENTRIES}))::int) AS uuid))
     FROM generate_series(1, 16)));""",
    # 100 entries, the hot one among them, as the RPC sends them: one uuid[] parameter.
    "counts_100": f"""\\set first random(2, {BENCH_ENTRIES - 100})
SELECT count(*) FROM entry_counts(
    (SELECT array_agg(CAST(md5('bench-entry-' || n) AS uuid)) FROM generate_series(:first, :first + 98) n)
    || CAST(md5('bench-entry-1') AS uuid), NULL);""",
    "transfer_uniform": f"\\set payer random(1, {BENCH_PAYERS})\n\\set payee random(1, {BENCH_USERS})\n"
    + _ONE_TRANSFER.format(payee="'bench-payee-' || :payee"),
    "transfer_hot": f"\\set payer random(1, {BENCH_PAYERS})\n" + _ONE_TRANSFER.format(payee="'bench-merchant'"),
}


def bench_entry_id(n: int) -> str:
    return str(uuid.UUID(hashlib.md5(f"bench-entry-{n}".encode()).hexdigest()))


class BenchFailed(ClientError):
    """The run cannot give trustworthy figures; the message says which phase and why."""

    def __str__(self) -> str:
        return f"bench failed: {self.args[0]}"


@dataclass(frozen=True)
class BenchTarget:
    """The server under load and its database."""

    address: str
    database_url: str
    metadata: tuple[tuple[str, str], ...]
    server_pid: int | None


@dataclass
class Figures:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float

    def line(self) -> str:
        return f"{self.name:<36} {self.rps:>9.0f} rps   p50 {self.p50_ms:>7.2f} ms   p99 {self.p99_ms:>7.2f} ms"


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of the samples (0 for none)."""
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (0.0, 0.0)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49], cuts[98]


async def measure(name: str, call: Callable[[], Awaitable[object]], duration: float, concurrency: int) -> Figures:
    """Runs `call` from `concurrency` workers for `duration` seconds (after a short warm-up).

    Raises BenchFailed if any call failed, warm-up included.
    """
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    calls = 0

    async def worker(until: float, record: bool) -> None:
        nonlocal calls
        while (started := time.perf_counter()) < until:
            calls += 1
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                failures[exc.code().name] += 1
            if record:
                latencies.append(time.perf_counter() - started)

    warm_until = time.perf_counter() + min(1.0, duration / 5)
    await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
    began = time.perf_counter()
    await asyncio.gather(*(worker(began + duration, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    if failures:
        codes = ", ".join(f"{code} {count}" for code, count in failures.most_common())
        raise BenchFailed(f"{name}: {failures.total()} of {calls} calls failed ({codes})")
    p50, p99 = percentiles(latencies)
    return Figures(name, len(latencies) / elapsed, p50 * 1000, p99 * 1000)


def run_pgbench(url: str, script: str, duration: float, clients: int) -> Figures:
    """pgbench on a stored function: throughput and latency straight at the database."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(PGBENCH_SCRIPTS[script] + "\n")
        f.flush()
        args = [str(embedded.bin_dir() / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
                "-T", str(max(int(duration), 1)), "--log", "-f", f.name, url]
        with tempfile.TemporaryDirectory() as logs:
            out = subprocess.run(args, capture_output=True, text=True, cwd=logs, timeout=duration + 60)
            lines = [line for log in Path(logs).glob("pgbench_log.*") for line in log.read_text().splitlines()]
            latencies_us = [int(line.split()[2]) for line in lines]
    name = f"pgbench {script} (c={clients})"
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if out.returncode or (failed and int(failed.group(1))):
        detail = failed.group(0) if failed and int(failed.group(1)) else (out.stderr.strip().splitlines() or ["-"])[-1]
        raise BenchFailed(f"{name}: pgbench exit code {out.returncode}: {detail}")
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    p50_us, p99_us = percentiles(latencies_us)
    return Figures(name, tps, p50_us / 1000, p99_us / 1000)


def rpc_scenarios(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> dict[str, Callable[[], Awaitable[object]]]:
    """Each scenario is one call with fresh random arguments."""
    health = health_pb2_grpc.HealthStub(channel)
    interactions = interaction_pb2_grpc.InteractionServiceStub(channel)
    follows = follow_pb2_grpc.FollowServiceStub(channel)
    tokens = token_pb2_grpc.TokenServiceStub(channel)
    hot_entry = bench_entry_id(1)

    def user() -> str:
        return f"bench-user-{random.randint(1, BENCH_USERS)}"

    def toggle(entry: Callable[[], str]) -> Callable[[], Awaitable[object]]:
        return lambda: interactions.ToggleResonance(
            interaction_pb2.ToggleResonanceRequest(user_id=user(), entry_id=entry()), metadata=metadata
        )

    def get_entries() -> Awaitable[object]:
        first = random.randint(2, BENCH_ENTRIES - 100)
        ids = [bench_entry_id(n) for n in range(first, first + 99)] + [hot_entry]
        request = interaction_pb2.GetEntriesRequest(entry_ids=ids, viewer_id="bench-viewer")
        return interactions.GetEntries(request, metadata=metadata)

    def follow(followed: Callable[[], str]) -> Callable[[], Awaitable[object]]:
        return lambda: follows.Follow(follow_pb2.FollowRequest(follower_id=user(), followed_id=followed()), metadata=metadata)

    def transfer(payee: Callable[[], str]) -> Callable[[], Awaitable[object]]:
        return lambda: tokens.Transfer(
            token_pb2.TransferRequest(
                from_user_id=f"bench-payer-{random.randint(1, BENCH_PAYERS)}", to_user_id=payee(), amount=1,
                reason="bench", request_id=uuid.uuid4().hex,
            ),
            metadata=metadata,
        )

    return {
        "health Check (transport ceiling)": lambda: health.Check(health_pb2.HealthCheckRequest()),
        "ToggleResonance uniform (100k)": toggle(lambda: bench_entry_id(random.randint(1, BENCH_ENTRIES))),
        "ToggleResonance hot entry": toggle(lambda: hot_entry),
        "GetEntries 100 ids": get_entries,
        "Follow uniform": follow(lambda: f"bench-followed-{random.randint(1, BENCH_ENTRIES)}"),
        "Follow one celebrity": follow(lambda: "bench-celebrity"),
        "Transfer uniform": transfer(lambda: f"bench-payee-{random.randint(1, BENCH_USERS)}"),
        "Transfer to one hot merchant": transfer(lambda: "bench-merchant"),
    }


PGBENCH_RUNS = (
    ("toggle_uniform", 8), ("toggle_hot", 8), ("toggle_uniform_batch16", 4), ("counts_100", 1),
    ("transfer_uniform", 8), ("transfer_hot", 8),
)


def print_ratios(figures: dict[str, Figures]) -> None:
    def rps(name: str) -> float:
        return figures[name].rps

    health = rps("health Check (transport ceiling)")
    rows = [
        ("ToggleResonance uniform / health Check", rps("ToggleResonance uniform (100k)") / health, ">= 0.7"),
        ("ToggleResonance hot / uniform", rps("ToggleResonance hot entry") / rps("ToggleResonance uniform (100k)"), ">= 0.9"),
        ("ToggleResonance uniform / pgbench 1-call",
         rps("ToggleResonance uniform (100k)") / rps("pgbench toggle_uniform (c=8)"), ""),
        ("pgbench toggle hot / uniform", rps("pgbench toggle_hot (c=8)") / rps("pgbench toggle_uniform (c=8)"), ">= 0.8"),
        ("Follow celebrity / uniform", rps("Follow one celebrity") / rps("Follow uniform"), ""),
        ("Transfer uniform / health Check", rps("Transfer uniform") / health, ">= 0.6"),
        ("Transfer hot merchant / uniform", rps("Transfer to one hot merchant") / rps("Transfer uniform"), ">= 0.5"),
        ("Transfer uniform / pgbench", rps("Transfer uniform") / rps("pgbench transfer_uniform (c=8)"), ""),
        ("pgbench transfer hot / uniform", rps("pgbench transfer_hot (c=8)") / rps("pgbench transfer_uniform (c=8)"), ""),
    ]
    print()
    for label, ratio, goal in rows:
        print(f"{label:<42} {ratio:5.2f}  {'(goal ' + goal + ')' if goal else ''}")
    batch = figures["pgbench toggle_uniform_batch16 (c=4)"]
    print(f"{'pgbench toggles/s in batches of 16':<42} {batch.rps * 16:5.0f}")
    print(f"{'pgbench counts_100 p50 (ms)':<42} {figures['pgbench counts_100 (c=1)'].p50_ms:5.3f}  (goal <= 1)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_until_serving(address: str, server: asyncio.subprocess.Process, timeout: float = 120.0) -> None:
    """Polls the health Check until SERVING; fails if the server exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.returncode is not None:
                raise BenchFailed(f"the bench's server exited with code {server.returncode} before serving")
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise BenchFailed(f"the bench's server on {address} was not SERVING after {timeout:.0f} s")
            await asyncio.sleep(0.2)


# Settings the bench's own server does not take from the bench command: where it
# listens, its database and secret (its own), TLS and metrics (off: plaintext load).
OWN_SERVER_FIXED = {"host", "port", "data_dir", "database_url", "jwt_secret", "jwt_public_key_file", "metrics_port",
                    "log_level"}


@contextlib.asynccontextmanager
async def throwaway_target(config: Config) -> AsyncIterator[BenchTarget]:
    """A `nexus serve` of the bench's own on a fresh embedded PostgreSQL in a temporary
    directory; the server is stopped and the directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as data_dir:
        pg = await asyncio.to_thread(embedded.EmbeddedPostgres.start, Path(data_dir))
        try:
            secret, port = secrets.token_urlsafe(32), _free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
            for f in dataclasses.fields(config):
                if f.name not in OWN_SERVER_FIXED and not f.name.startswith("tls_"):
                    env[env_var(f.name)] = str(getattr(config, f.name))
            # One log line per RPC would cost the server CPU the figures are about.
            env.update(NEXUS_HOST="127.0.0.1", NEXUS_PORT=str(port), NEXUS_DATABASE_URL=pg.url,
                       NEXUS_JWT_SECRET=secret, NEXUS_LOG_LEVEL="warning")
            server = await asyncio.create_subprocess_exec(sys.executable, "-m", "nexus.cli", "serve", env=env)
            try:
                address = f"127.0.0.1:{port}"
                await _wait_until_serving(address, server)
                metadata = (("authorization", f"Bearer {mint_token(secret, 'bench', service=True)}"),)
                yield BenchTarget(address, pg.url, metadata, server.pid)
            finally:
                if server.returncode is None:
                    server.terminate()
                    try:
                        await asyncio.wait_for(server.wait(), 30)
                    except TimeoutError:
                        server.kill()
                        await server.wait()
        finally:
            await asyncio.to_thread(pg.stop)


@contextlib.asynccontextmanager
async def configured_target(config: Config, server_pid: int | None) -> AsyncIterator[BenchTarget]:
    """The configured server and database (`--disposable-database`); the server must answer
    SERVING before anything is written."""
    if config.client_tls:
        raise BenchFailed("the bench speaks plaintext; bench a plaintext server (or leave out --disposable-database)")
    address = server_address(config)
    metadata = service_metadata(config, "bench")
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.aio.AioRpcError as exc:
            raise BenchFailed(describe_rpc_error(address, exc)) from None
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise BenchFailed(f"{address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}")
    with database_url(config) as url:
        yield BenchTarget(address, url, metadata, server_pid)


async def run_bench(config: Config, args: argparse.Namespace) -> int:
    """Exit code 0 when every phase ran without a failed call and reconcile found no drift."""
    target_context = configured_target(config, args.server_pid) if args.disposable_database else throwaway_target(config)
    async with target_context as target:
        try:
            drift = 0
            if args.suite in ("interactions", "all"):
                drift = await run_interaction_bench(target.address, target.database_url, target.metadata,
                                                    args.duration, args.concurrency)
            if args.suite in ("memory", "all"):
                from nexus.bench_memory import run_memory_bench

                print()
                await run_memory_bench(target.address, target.database_url, target.metadata, args.duration,
                                       args.concurrency, target.server_pid, args.event_rate)
        except grpc.aio.AioRpcError as exc:
            raise BenchFailed(describe_rpc_error(target.address, exc)) from None
    return 0 if not drift else 1


async def run_interaction_bench(
    target: str, url: str, metadata: tuple[tuple[str, str], ...], duration: float, concurrency: int
) -> int:
    """The interaction, follow and token figures; returns the reconcile drift found."""
    conn = await database.connect(url)
    try:
        await conn.execute(SETUP_SQL)
    finally:
        await conn.close()

    figures: dict[str, Figures] = {}
    print(f"target {target}, {duration:.0f} s per scenario, {concurrency} calls in flight (8 for GetEntries)")
    async with grpc.aio.insecure_channel(target) as channel:
        for name, call in rpc_scenarios(channel, metadata).items():
            in_flight = 8 if name.startswith("GetEntries") else concurrency
            figures[name] = await measure(name, call, duration, in_flight)
            print(figures[name].line())
    for script, clients in PGBENCH_RUNS:
        result = await asyncio.to_thread(run_pgbench, url, script, duration, clients)
        figures[result.name] = result
        print(result.line())
    print_ratios(figures)

    conn = await database.connect(url)
    try:
        drift = await reconcile(conn, fix=False)
    finally:
        await conn.close()
    print(f"invariants: reconcile drift {len(drift)} (must be 0)")
    return len(drift)
