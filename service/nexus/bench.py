"""``nexus bench``: load figures for a running server, measured in one run.

Ceilings first, then the service, so the ratios compare like with like on a
noisy shared machine:
- transport ceiling: the standard health Check RPC (no database work);
- database ceiling: pgbench calling the same stored functions the RPCs call.
Then the invariants are checked (reconcile must find no drift).
Every call goes to the configured host (127.0.0.1 by default) and every
scenario is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus import database, embedded
from nexus.auth import mint_token
from nexus.config import Config
from nexus.reconcile import reconcile
from nexus.server import resolve_secret
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


@dataclass
class Figures:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int

    def line(self) -> str:
        return f"{self.name:<36} {self.rps:>9.0f} rps   p50 {self.p50_ms:>7.2f} ms   p99 {self.p99_ms:>7.2f} ms   errors {self.errors}"


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of the samples (0 for none)."""
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (0.0, 0.0)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49], cuts[98]


async def measure(name: str, call: Callable[[], Awaitable[object]], duration: float, concurrency: int) -> Figures:
    """Runs `call` from `concurrency` workers for `duration` seconds (after a short warm-up)."""
    latencies: list[float] = []
    failures = 0

    async def worker(until: float, record: bool) -> None:
        nonlocal failures
        while (started := time.perf_counter()) < until:
            try:
                await call()
            except grpc.aio.AioRpcError:
                failures += record
            if record:
                latencies.append(time.perf_counter() - started)

    warm_until = time.perf_counter() + min(1.0, duration / 5)
    await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
    began = time.perf_counter()
    await asyncio.gather(*(worker(began + duration, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    p50, p99 = percentiles(latencies)
    return Figures(name, len(latencies) / elapsed, p50 * 1000, p99 * 1000, failures)


def run_pgbench(url: str, script: str, duration: float, clients: int) -> Figures:
    """pgbench on a stored function: throughput and latency straight at the database."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(PGBENCH_SCRIPTS[script] + "\n")
        f.flush()
        args = [str(embedded.bin_dir() / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
                "-T", str(max(int(duration), 1)), "--log", "-f", f.name, url]
        with tempfile.TemporaryDirectory() as logs:
            out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=logs, timeout=duration + 60)
            latencies_us = [int(line.split()[2]) for log in Path(logs).glob("pgbench_log.*") for line in log.read_text().splitlines()]
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    p50_us, p99_us = percentiles(latencies_us)
    return Figures(f"pgbench {script} (c={clients})", tps, p50_us / 1000, p99_us / 1000, 0)


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
        return interactions.GetEntries(interaction_pb2.GetEntriesRequest(entry_ids=ids, viewer_id="bench-viewer"), metadata=metadata)

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
        ("ToggleResonance uniform / pgbench 1-call", rps("ToggleResonance uniform (100k)") / rps("pgbench toggle_uniform (c=8)"), ""),
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


async def run_bench(config: Config, url: str, args: argparse.Namespace) -> int:
    secret = resolve_secret(config)
    if not secret:
        print("bench needs the server's HS256 secret (NEXUS_JWT_SECRET)")
        return 2
    metadata = (("authorization", f"Bearer {mint_token(secret, 'bench', service=True)}"),)
    target = f"{config.host}:{config.port}"
    drift = 0
    if args.suite in ("interactions", "all"):
        drift = await run_interaction_bench(target, url, metadata, args.duration, args.concurrency)
    if args.suite in ("memory", "all"):
        from nexus.bench_memory import run_memory_bench

        print()
        await run_memory_bench(target, url, metadata, args.duration, args.concurrency, args.server_pid, args.event_rate)
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
