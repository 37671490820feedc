"""``nexus bench``: load figures for a running server, measured in one run.

Ceilings first, then the service, so the ratios compare like with like on a
noisy shared machine:
- transport ceiling: the standard health Check RPC (no database work);
- database ceiling: pgbench calling the same stored function the RPC calls.
Then the invariants are checked (reconcile must find no drift).
Every call goes to the configured host (127.0.0.1 by default) and every
scenario is bounded by --duration.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus import database, embedded
from nexus.auth import mint_token
from nexus.config import Config
from nexus.reconcile import reconcile
from nexus.server import resolve_secret
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import interaction_pb2_grpc

BENCH_ENTRIES = 100_000
BENCH_USERS = 1_000_000

# Entries whose ids pgbench can compute: md5('bench-entry-' || n)::uuid.
SETUP_SQL = f"""
INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type, title,
                     content, privacy, tags, metadata)
SELECT id, 'bench-author', id, 0, 0, '{{}}', 'post', 'bench', 'bench entry', 'public', '{{}}', '{{}}'
FROM generate_series(1, {BENCH_ENTRIES}) n, CAST(md5('bench-entry-' || n) AS uuid) AS id
ON CONFLICT DO NOTHING;
ANALYZE entries;
"""

PGBENCH_SCRIPTS = {
    "toggle_uniform": f"""\\set entry random(1, {BENCH_ENTRIES})
\\set user random(1, {BENCH_USERS})
SELECT * FROM apply_reactions(ARRAY['toggle'], ARRAY['resonance']::reaction_kind[], ARRAY['bench-user-' || :user],
                               ARRAY[CAST(md5('bench-entry-' || :entry) AS uuid)]);
""",
    "toggle_hot": f"""\\set user random(1, {BENCH_USERS})
SELECT * FROM apply_reactions(ARRAY['toggle'], ARRAY['resonance']::reaction_kind[], ARRAY['bench-user-' || :user],
                               ARRAY[CAST(md5('bench-entry-1') AS uuid)]);
""",
    # 16 writes in one call: what the service's group commit sends under load.
    "toggle_uniform_batch16": f"""SELECT count(*) FROM apply_reactions(
    array_fill('toggle'::text, ARRAY[16]), array_fill('resonance'::reaction_kind, ARRAY[16]),
    (SELECT array_agg('bench-user-' || (1 + floor(random() * {BENCH_USERS}))::int) FROM generate_series(1, 16)),
    (SELECT array_agg(CAST(md5('bench-entry-' || (1 + floor(random() * {BENCH_ENTRIES}))::int) AS uuid))
     FROM generate_series(1, 16)));
""",
    # 100 entries, the hot one among them, as the RPC sends them: one uuid[] parameter.
    "counts_100": f"""\\set first random(2, {BENCH_ENTRIES - 100})
SELECT count(*) FROM entry_counts(
    (SELECT array_agg(CAST(md5('bench-entry-' || n) AS uuid)) FROM generate_series(:first, :first + 98) n)
    || CAST(md5('bench-entry-1') AS uuid), NULL);
""",
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
        return f"{self.name:<34} {self.rps:>9.0f} rps   p50 {self.p50_ms:>7.2f} ms   p99 {self.p99_ms:>7.2f} ms   errors {self.errors}"


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
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Figures(name, len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000, failures)


def run_pgbench(url: str, script: str, duration: float, clients: int) -> Figures:
    """pgbench on a stored function: throughput and latency straight at the database."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(PGBENCH_SCRIPTS[script])
        f.flush()
        args = [str(embedded.bin_dir() / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
                "-T", str(max(int(duration), 1)), "-P", "1", "--log", "-f", f.name, url]
        with tempfile.TemporaryDirectory() as logs:
            out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=logs, timeout=duration + 60)
            latencies_us = [int(line.split()[2]) for log in Path(logs).glob("pgbench_log.*") for line in log.read_text().splitlines()]
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    cuts = statistics.quantiles(latencies_us, n=100)
    return Figures(f"pgbench {script} (c={clients})", tps, cuts[49] / 1000, cuts[98] / 1000, 0)


async def run_bench(config: Config, duration: float, concurrency: int) -> int:
    secret = resolve_secret(config)
    if not secret:
        print("bench needs the server's HS256 secret (NEXUS_JWT_SECRET)")
        return 2
    url = config.database_url or embedded.EmbeddedPostgres.start(config.data_dir).url
    conn = await database.connect(url)
    try:
        await conn.execute(SETUP_SQL)
    finally:
        await conn.close()

    metadata = (("authorization", f"Bearer {mint_token(secret, 'bench', service=True)}"),)
    target = f"{config.host}:{config.port}"
    results: list[Figures] = []
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        interactions = interaction_pb2_grpc.InteractionServiceStub(channel)
        hot_entry = bench_entry_id(1)
        check = health_pb2.HealthCheckRequest()

        def toggle(entry: Callable[[], str]) -> Callable[[], Awaitable[object]]:
            def call() -> Awaitable[object]:
                user = f"bench-user-{random.randint(1, BENCH_USERS)}"
                return interactions.ToggleResonance(
                    pb.ToggleResonanceRequest(user_id=user, entry_id=entry()), metadata=metadata
                )

            return call

        def get_entries() -> Awaitable[object]:
            first = random.randint(2, BENCH_ENTRIES - 100)
            ids = [bench_entry_id(n) for n in range(first, first + 99)] + [hot_entry]
            return interactions.GetEntries(pb.GetEntriesRequest(entry_ids=ids, viewer_id="bench-viewer"), metadata=metadata)

        print(f"target {target}, {duration:.0f} s per scenario, {concurrency} calls in flight")
        results.append(await measure("health Check (transport ceiling)", lambda: health.Check(check), duration, concurrency))
        print(results[-1].line())
        results.append(
            await measure("ToggleResonance uniform (100k)", toggle(lambda: bench_entry_id(random.randint(1, BENCH_ENTRIES))), duration, concurrency)
        )
        print(results[-1].line())
        results.append(await measure("ToggleResonance hot entry", toggle(lambda: hot_entry), duration, concurrency))
        print(results[-1].line())
        results.append(await measure("GetEntries 100 ids", get_entries, duration, min(concurrency, 8)))
        print(results[-1].line())

    for script, clients in (("toggle_uniform", 8), ("toggle_hot", 8), ("toggle_uniform_batch16", 4), ("counts_100", 1)):
        results.append(await asyncio.to_thread(run_pgbench, url, script, duration, clients))
        print(results[-1].line())
    print(f"{'  = toggles per second':<34} {results[-2].rps * 16:>9.0f}")

    by_name = {r.name: r for r in results}
    db_batched = by_name["pgbench toggle_uniform_batch16 (c=4)"].rps * 16
    health_rps = by_name["health Check (transport ceiling)"].rps
    uniform = by_name["ToggleResonance uniform (100k)"].rps
    hot = by_name["ToggleResonance hot entry"].rps
    db_uniform = by_name["pgbench toggle_uniform (c=8)"].rps
    db_hot = by_name["pgbench toggle_hot (c=8)"].rps
    print()
    print(f"ToggleResonance uniform / health Check   {uniform / health_rps:.2f}  (goal >= 0.7)")
    print(f"ToggleResonance hot / uniform (RPC)      {hot / uniform:.2f}  (goal >= 0.9)")
    print(f"ToggleResonance uniform / pgbench        {uniform / db_uniform:.2f} (single calls), {uniform / db_batched:.2f} (batches of 16)")
    print(f"pgbench hot / uniform                    {db_hot / db_uniform:.2f}  (goal >= 0.8)")
    print(f"pgbench counts_100 p50                   {by_name['pgbench counts_100 (c=1)'].p50_ms:.3f} ms  (goal <= 1 ms)")

    conn = await database.connect(url)
    try:
        drift = await reconcile(conn, fix=False)
    finally:
        await conn.close()
    print(f"invariants: reconcile drift {len(drift)} (must be 0)")
    return 0 if not drift else 1
