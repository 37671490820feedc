"""``nexus bench --suite memory``: MemoryService and stream figures, one run.

- SearchMemories recall@10 against exact search, and latency, on 200k
  memories: ten users holding 10k each (searched exactly) and one holding
  100k (searched through HNSW). Vectors are clustered (100 centres plus
  noise), loaded in bulk with the vector indexes rebuilt afterwards.
- ListMemories with the seed's example filter, p50/p99.
- Delivery latency, commit -> client, with 1000 subscribers while events are
  written at a fixed rate (default 1000/s) straight into the database.
- CreateMemory throughput with no stream open, then with a stream open for
  every writing user; the ratio is the cost of streaming.
- Resident memory of the server holding 10k idle streams (needs --server-pid).
Every call goes to the configured host (127.0.0.1 by default); every phase is
bounded by --duration or by a fixed count.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from nexus import database
from nexus.bench import BenchFailed, measure, percentiles
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

DIM = 384
BIG_USER = "bench-mem-big"
SMALL_USERS = [f"bench-mem-{n}" for n in range(10)]
PER_SMALL_USER = 10_000
BIG_USER_MEMORIES = 100_000
SEARCH_QUERIES = 100
LIVE_SUBSCRIBERS = 1000
IDLE_STREAMS = 10_000
STREAMS_PER_CHANNEL = 500

# Clustered vectors: 100 random centres, each memory a centre plus uniform noise.
LOAD_SQL = f"""
SET maintenance_work_mem = '1GB';
CREATE TEMP TABLE bench_centres AS
    SELECT c, array_agg(random() * 2 - 1 ORDER BY i)::real[] AS v
    FROM generate_series(1, 100) c, generate_series(1, {DIM}) i GROUP BY c;
CREATE TEMP TABLE bench_vector_indexes AS
    SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'memories' AND indexdef LIKE '%USING hnsw%';
DO $$ DECLARE r record; BEGIN
    FOR r IN SELECT * FROM bench_vector_indexes LOOP EXECUTE format('DROP INDEX %I', r.indexname); END LOOP;
END $$;
INSERT INTO memories (user_id, content, gravity_score, emotion_type, temporal_type, embedding, create_time)
SELECT CASE WHEN n <= {BIG_USER_MEMORIES} THEN '{BIG_USER}' ELSE 'bench-mem-' || (n % 10) END,
       'bench memory ' || n, random(), (ARRAY['joy', 'calm', 'fear', 'awe'])[1 + n % 4], 'present',
       (SELECT array_agg(ce.v[i] + (random() - 0.5) * 0.6 ORDER BY i) FROM generate_series(1, {DIM}) i)::vector,
       now() - random() * interval '30 days'
FROM generate_series(1, {BIG_USER_MEMORIES + PER_SMALL_USER * len(SMALL_USERS)}) n
JOIN bench_centres ce ON ce.c = 1 + (hashint4(n) & 1023) % 100;
DO $$ DECLARE r record; BEGIN
    FOR r IN SELECT * FROM bench_vector_indexes LOOP EXECUTE r.indexdef; END LOOP;
END $$;
INSERT INTO memory_users (user_id, memory_count)
SELECT user_id, count(*) FROM memories WHERE user_id LIKE 'bench-mem-%' GROUP BY user_id
ON CONFLICT (user_id) DO UPDATE SET memory_count = EXCLUDED.memory_count;
"""

EXACT_TOP10 = """
SELECT array_agg(memory_id::text) FROM (
    SELECT memory_id FROM memories WHERE user_id = $1 ORDER BY embedding <=> $2::real[]::vector LIMIT 10) nearest
"""


async def _load(conn: asyncpg.Connection) -> None:
    if await conn.fetchval("SELECT count(*) FROM memories WHERE user_id = $1", BIG_USER):
        return  # loaded by an earlier run on this database
    started = time.perf_counter()
    await conn.execute(LOAD_SQL)
    await conn.execute("VACUUM ANALYZE memories")
    print(f"loaded {BIG_USER_MEMORIES + PER_SMALL_USER * len(SMALL_USERS)} memories and built their indexes "
          f"in {time.perf_counter() - started:.0f} s")


async def _search_figures(
    stub: memory_pb2_grpc.MemoryServiceStub, conn: asyncpg.Connection, metadata: tuple[tuple[str, str], ...],
    label: str, users: list[str],
) -> None:
    """Recall@10 of SearchMemories against exact search, and its latency (one call at a time)."""
    queries = await conn.fetch(
        "SELECT user_id, embedding::real[] AS v FROM memories WHERE user_id = ANY($1) ORDER BY random() LIMIT $2",
        users, SEARCH_QUERIES,
    )
    # Each query is near, not on, a stored vector of its user.
    probes = [(q["user_id"], [x + random.uniform(-0.05, 0.05) for x in q["v"]]) for q in queries]
    latencies, recalls = [], []
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
        exact = [set(await conn.fetchval(EXACT_TOP10, user_id, probe)) for user_id, probe in probes]
    for (user_id, probe), truth in zip(probes, exact):
        started = time.perf_counter()
        response = await stub.SearchMemories(
            pb.SearchMemoriesRequest(user_id=user_id, embedding=probe, top_k=10), metadata=metadata
        )
        latencies.append(time.perf_counter() - started)
        recalls.append(len({r.memory.memory_id for r in response.results} & truth) / 10)
    p50, p99 = percentiles(latencies)
    print(f"SearchMemories {label:<28} recall@10 {statistics.mean(recalls):.3f} (min {min(recalls):.1f})   "
          f"p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")


async def _list_figures(stub: memory_pb2_grpc.MemoryServiceStub, metadata: tuple[tuple[str, str], ...]) -> None:
    """The seed's example: one user, last 7 days, gravity >= 0.7, newest 50."""
    latencies = []
    for i in range(200):
        since = timestamp_pb2.Timestamp()
        since.FromDatetime(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=7))
        started = time.perf_counter()
        await stub.ListMemories(
            pb.ListMemoriesRequest(user_id=SMALL_USERS[i % len(SMALL_USERS)] if i % 2 else BIG_USER, since=since,
                                   min_gravity=0.7, page_size=50),
            metadata=metadata,
        )
        latencies.append(time.perf_counter() - started)
    p50, p99 = percentiles(latencies)
    print(f"ListMemories seed filter (7 days, >= 0.7, 50)  p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms  (RPC)")


async def _open_streams(
    target: str, metadata: tuple[tuple[str, str], ...], users: list[str]
) -> tuple[list[grpc.aio.Channel], list[grpc.aio.UnaryStreamCall]]:
    """One SubscribeMemories stream per user, each registered (initial metadata received)."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(0, len(users), STREAMS_PER_CHANNEL)]
    calls = [
        memory_pb2_grpc.MemoryServiceStub(channels[i // STREAMS_PER_CHANNEL]).SubscribeMemories(
            pb.SubscribeMemoriesRequest(user_id=user), metadata=metadata
        )
        for i, user in enumerate(users)
    ]
    for start in range(0, len(calls), 500):
        await asyncio.gather(*(call.initial_metadata() for call in calls[start:start + 500]))
    return channels, calls


async def _stop_readers(phase: str, readers: list[asyncio.Task[None]]) -> None:
    """Cancels the stream readers; a stream that had already failed fails the phase."""
    for reader in readers:
        reader.cancel()
    results = await asyncio.gather(*readers, return_exceptions=True)
    failed = Counter(
        r.code().name if isinstance(r, grpc.aio.AioRpcError) else type(r).__name__
        for r in results if isinstance(r, Exception)
    )
    if failed:
        codes = ", ".join(f"{code} {count}" for code, count in failed.most_common())
        raise BenchFailed(f"{phase}: {failed.total()} of {len(readers)} streams failed ({codes})")


async def _close_streams(channels: list[grpc.aio.Channel], calls: list[grpc.aio.UnaryStreamCall]) -> None:
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()


async def _delivery_figures(target: str, url: str, metadata: tuple[tuple[str, str], ...], rate: int, duration: float) -> None:
    """Latency from the event's commit to its arrival, 1000 subscribers, writes paced at `rate`/s."""
    users = [f"bench-live-{n}" for n in range(LIVE_SUBSCRIBERS)]
    channels, calls = await _open_streams(target, metadata, users)
    latencies: list[float] = []

    async def receive(call: grpc.aio.UnaryStreamCall) -> None:
        async for event in call:
            latencies.append(time.time() - event.event_time.ToNanoseconds() / 1e9)

    readers = [asyncio.create_task(receive(call)) for call in calls]
    pool = await asyncpg.create_pool(url, min_size=8, max_size=8)
    written = 0
    try:
        began = time.perf_counter()
        interval = 1 / rate
        in_flight: set[asyncio.Task[None]] = set()
        while (now := time.perf_counter()) < began + duration:
            due = int((now - began) / interval) + 1
            for n in range(written, due):
                task = asyncio.create_task(pool.execute(
                    "SELECT create_memory($1, 'bench live', NULL, NULL, NULL, 0.5, NULL, '{}', '{}', NULL, NULL, NULL)",
                    users[n % len(users)],
                ))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            written = due
            await asyncio.sleep(interval)
        await asyncio.gather(*in_flight)
        elapsed = time.perf_counter() - began
        deadline = time.perf_counter() + 10
        while len(latencies) < written and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    finally:
        try:
            await _stop_readers("delivery", readers)
        finally:
            await _close_streams(channels, calls)
            await pool.close()
    if len(latencies) < written:
        raise BenchFailed(f"delivery: {written - len(latencies)} of {written} events not received within 10 s")
    p50, p99 = percentiles(latencies)
    print(f"delivery commit -> client, {LIVE_SUBSCRIBERS} subscribers, {written / elapsed:.0f} events/s written: "
          f"received {len(latencies)}/{written}   p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")


async def _create_figures(
    target: str, metadata: tuple[tuple[str, str], ...], duration: float, concurrency: int
) -> None:
    """CreateMemory (with a 384-float embedding) without, then with, a stream per writing user."""
    users = [f"bench-writer-{n}" for n in range(LIVE_SUBSCRIBERS)]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)

        def create() -> Awaitable[object]:
            return stub.CreateMemory(
                pb.CreateMemoryRequest(
                    user_id=random.choice(users), content="bench create", gravity_score=random.random(),
                    emotion_type="calm", embedding=[random.uniform(-1, 1) for _ in range(DIM)],
                ),
                metadata=metadata,
            )

        off = await measure("CreateMemory, no streams", create, duration, concurrency)
        print(off.line())
        channels, calls = await _open_streams(target, metadata, users)
        drained = [0]

        async def drain(call: grpc.aio.UnaryStreamCall) -> None:
            async for _ in call:
                drained[0] += 1

        readers = [asyncio.create_task(drain(call)) for call in calls]
        try:
            on = await measure(f"CreateMemory, {len(users)} streams open", create, duration, concurrency)
        finally:
            try:
                await _stop_readers("CreateMemory with streams open", readers)
            finally:
                await _close_streams(channels, calls)
    print(on.line() + f"   events streamed {drained[0]}")
    print(f"{'CreateMemory streaming on / off':<42} {on.rps / off.rps:5.2f}  (goal >= 0.8)")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _idle_stream_figures(target: str, metadata: tuple[tuple[str, str], ...], server_pid: int | None) -> None:
    before = _rss_mib(server_pid) if server_pid else None
    started = time.perf_counter()
    channels, calls = await _open_streams(target, metadata, [f"bench-idle-{n}" for n in range(IDLE_STREAMS)])
    opened = time.perf_counter() - started
    try:
        await asyncio.sleep(2)  # let the server settle before reading its memory (no assertion on time)
        if server_pid:
            after = _rss_mib(server_pid)
            print(f"{IDLE_STREAMS} idle streams opened in {opened:.1f} s: server RSS {before:.0f} -> {after:.0f} MiB "
                  f"({(after - before) * 1024 / IDLE_STREAMS:.1f} KiB per stream; goal total <= 1024 MiB)")
        else:
            print(f"{IDLE_STREAMS} idle streams opened in {opened:.1f} s (pass --server-pid for the server's RSS)")
    finally:
        await _close_streams(channels, calls)


async def run_memory_bench(
    target: str, url: str, metadata: tuple[tuple[str, str], ...], duration: float, concurrency: int,
    server_pid: int | None, event_rate: int,
) -> None:
    conn = await database.connect(url)
    try:
        await _load(conn)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            await _search_figures(stub, conn, metadata, "users of 10k (exact)", SMALL_USERS)
            await _search_figures(stub, conn, metadata, "one user of 100k (HNSW)", [BIG_USER])
            await _list_figures(stub, metadata)
    finally:
        await conn.close()
    await _delivery_figures(target, url, metadata, event_rate, duration)
    await _create_figures(target, metadata, duration, concurrency)
    await _idle_stream_figures(target, metadata, server_pid)

