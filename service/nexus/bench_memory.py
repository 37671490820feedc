"""``nexus bench --suite memory``: MemoryService and stream figures, one run.

- SearchMemories recall@10 against exact search, and latency, on 200k
  memories: ten users holding 10k each (searched exactly) and one holding
  100k (searched through their own IVFFlat index, built by the maintenance job
  after the load). Vectors are clustered (100 centres plus noise); contents
  are 6-20 words of a 5000-word Zipf-like vocabulary, loaded in bulk.
- SearchMemories by text (BM25) and hybrid, p50/p99, on the same users.
- Retrieval quality on a small labelled set (facts among chatter, questions
  that paraphrase them): recall@10 of vector, text and hybrid search, with
  wordllama embeddings zero-padded to the bench's dimension (cosine is
  unchanged by padding); skipped without the wordllama extra.
- ListMemories with the seed's example filter, p50/p99.
- Delivery latency, commit -> client, with 1000 subscribers while events are
  written at a fixed rate (default 1000/s) straight into the database.
- CreateMemory throughput with no stream open, then with a stream open for
  every writing user (the ratio is the cost of streaming), then
  ToggleResonance in the same run: CreateMemory with streams / ToggleResonance.
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
from nexus.bench import SETUP_SQL, BenchFailed, measure, percentiles, rpc_scenarios
from nexus.config import Config
from nexus.maintenance import Maintenance
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
INSERT INTO memories (user_id, content, gravity_score, emotion_type, temporal_type, embedding, create_time)
SELECT CASE WHEN n <= {BIG_USER_MEMORIES} THEN '{BIG_USER}' ELSE 'bench-mem-' || (n % 10) END,
       (SELECT string_agg('w' || floor(power(random(), 3) * 5000)::int, ' ') FROM generate_series(1, 6 + n % 15)),
       random(), (ARRAY['joy', 'calm', 'fear', 'awe'])[1 + n % 4], 'present',
       (SELECT array_agg(ce.v[i] + (random() - 0.5) * 0.6 ORDER BY i) FROM generate_series(1, {DIM}) i)::vector,
       now() - random() * interval '30 days'
FROM generate_series(1, {BIG_USER_MEMORIES + PER_SMALL_USER * len(SMALL_USERS)}) n
JOIN bench_centres ce ON ce.c = 1 + (hashint4(n) & 1023) % 100;
INSERT INTO memory_users (user_id, memory_count)
SELECT user_id, count(*) FROM memories WHERE user_id LIKE 'bench-mem-%' GROUP BY user_id
ON CONFLICT (user_id) DO UPDATE SET memory_count = EXCLUDED.memory_count;
"""

EXACT_TOP10 = """
SELECT array_agg(memory_id::text) FROM (
    SELECT memory_id FROM memories WHERE user_id = $1 ORDER BY embedding <=> $2::real[]::vector LIMIT 10) nearest
"""


async def _load(conn: asyncpg.Connection, url: str) -> None:
    """The search corpus, then the big user's own vector index, built by the
    maintenance job the server runs (default settings: above 10k memories)."""
    if not await conn.fetchval("SELECT count(*) FROM memories WHERE user_id = $1", BIG_USER):
        started = time.perf_counter()
        await conn.execute(LOAD_SQL)
        await conn.execute("VACUUM ANALYZE memories")
        print(f"loaded {BIG_USER_MEMORIES + PER_SMALL_USER * len(SMALL_USERS)} memories in "
              f"{time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    db = await database.Database.open(
        url, min_size=1, max_size=1, statement_timeout_ms=30_000, slow_warn_ms=10**9, slow_error_ms=10**9
    )
    try:
        built = await Maintenance(db, Config()).build_vector_indexes()
    finally:
        await db.close()
    if built:
        print(f"maintenance built the vector index of {', '.join(built)} in {time.perf_counter() - started:.0f} s")


async def _search_figures(
    stub: memory_pb2_grpc.MemoryServiceAsyncStub, conn: asyncpg.Connection, metadata: tuple[tuple[str, str], ...],
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
    for (user_id, probe), truth in zip(probes, exact, strict=True):
        started = time.perf_counter()
        response = await stub.SearchMemories(
            pb.SearchMemoriesRequest(user_id=user_id, embedding=probe, top_k=10), metadata=metadata
        )
        latencies.append(time.perf_counter() - started)
        recalls.append(len({r.memory.memory_id for r in response.results} & truth) / 10)
    p50, p99 = percentiles(latencies)
    print(f"SearchMemories {label:<28} recall@10 {statistics.mean(recalls):.3f} (min {min(recalls):.1f})   "
          f"p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")


async def _text_figures(
    stub: memory_pb2_grpc.MemoryServiceAsyncStub, conn: asyncpg.Connection, metadata: tuple[tuple[str, str], ...],
    label: str, users: list[str],
) -> None:
    """Text-only and hybrid latency (one call at a time): two or three words of
    a stored memory of the user as the query, a vector near it as the embedding."""
    rows = await conn.fetch(
        "SELECT user_id, content, embedding::real[] AS v FROM memories WHERE user_id = ANY($1) ORDER BY random() LIMIT $2",
        users, SEARCH_QUERIES,
    )
    for mode in ("text", "hybrid"):
        latencies, found = [], 0
        for row in rows:
            words = row["content"].split()
            request = pb.SearchMemoriesRequest(
                user_id=row["user_id"], query=" ".join(random.sample(words, min(len(words), random.randint(2, 3)))),
                top_k=10,
            )
            if mode == "hybrid":
                request.embedding.extend(x + random.uniform(-0.05, 0.05) for x in row["v"])
            started = time.perf_counter()
            response = await stub.SearchMemories(request, metadata=metadata)
            latencies.append(time.perf_counter() - started)
            found += len(response.results) == 10
        p50, p99 = percentiles(latencies)
        print(f"SearchMemories {mode + ' ' + label:<35} full pages {found}/{len(rows)}   "
              f"p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")


# A labelled set: facts (the evidence) among chatter, and questions that
# paraphrase the facts. Every quality user holds all the facts and their own
# chatter.
FACTS = [
    ("My daughter Emma started violin lessons in September", "What instrument is my kid learning?"),
    ("I am allergic to peanuts so I always check food labels", "Do I have any allergies?"),
    ("We adopted a golden retriever puppy called Biscuit", "What is the name of our dog?"),
    ("My brother Tom moved to Lisbon for a software job", "Which city does my brother live in now?"),
    ("I ran my first marathon in Berlin last spring", "Have I ever completed a long-distance race?"),
    ("Our wedding anniversary is on the twelfth of June", "When do my wife and I celebrate our anniversary?"),
    ("I switched careers from accounting to nursing", "What did I work as before becoming a nurse?"),
    ("My favourite dish is my grandmother's mushroom risotto", "What food do I love most?"),
    ("I have been learning Japanese on my commute", "Which language am I studying?"),
    ("The doctor said my blood pressure is too high", "What health problem did my physician mention?"),
    ("We are saving money to buy a house near the coast", "What are we saving up for?"),
    ("My laptop broke so I bought a new one on sale", "Why did I get a new computer?"),
    ("I volunteer at the animal shelter every Saturday morning", "What do I do on weekends to help out?"),
    ("My son Leo is afraid of the dark and sleeps with a nightlight", "What is my boy scared of?"),
    ("I quit smoking three years ago", "Do I still smoke cigarettes?"),
    ("Our team won the regional chess tournament", "Did we win any competition?"),
]
CHATTER = [
    "Had {meal} with {name} at the {place}", "Watched a {genre} movie with {name} last night",
    "The weather in {city} was {weather} today", "Talked to {name} about {topic} for an hour",
    "Need to buy {item} and {item2} tomorrow", "The meeting about the {topic} project ran late",
    "{name} recommended a book about {topic}", "Spent the afternoon cleaning the {room}",
    "Thinking about a trip to {city} next year", "My {relative} called to ask about {topic}",
    "Tried a new {meal} recipe with {item}", "Walked to the {place} and back in the rain",
]
SLOTS = {
    "meal": ["breakfast", "lunch", "dinner", "brunch", "pasta", "soup"],
    "name": ["Anna", "Ben", "Carla", "David", "Eva", "Farid", "Grace", "Hugo"],
    "place": ["cafe", "park", "library", "gym", "market", "office", "beach"],
    "genre": ["horror", "comedy", "sci-fi", "romance", "documentary"],
    "city": ["Paris", "Madrid", "Oslo", "Chicago", "Seoul", "Rome"],
    "weather": ["sunny", "windy", "grey", "freezing", "humid"],
    "topic": ["taxes", "football", "gardening", "music", "politics", "cooking", "travel", "work", "pets", "health"],
    "item": ["milk", "batteries", "shoes", "coffee", "a lamp", "bread"],
    "item2": ["eggs", "a charger", "socks", "tea", "paint", "rice"],
    "room": ["kitchen", "garage", "attic", "bathroom"],
    "relative": ["mother", "father", "aunt", "cousin", "uncle"],
}
QUALITY_USERS = [f"bench-quality-{n}" for n in range(5)]
CHATTER_PER_USER = 300


async def _quality_figures(stub: memory_pb2_grpc.MemoryServiceAsyncStub, metadata: tuple[tuple[str, str], ...]) -> None:
    """Recall@10 of the fact each question paraphrases, per search mode."""
    try:
        from nexus.embedder import from_config
    except ImportError:
        print("retrieval quality: skipped (needs the wordllama extra)")
        return
    try:
        model = from_config("wordllama")
    except RuntimeError:
        print("retrieval quality: skipped (needs the wordllama extra)")
        return
    assert model is not None
    rng = random.Random(11)

    def padded(text: str) -> list[float]:
        vector = model.embed_batch([text])[0] or [1.0] + [0.0] * (model.dim - 1)
        return vector + [0.0] * (DIM - model.dim)

    evidence: dict[tuple[str, int], str] = {}

    async def load(user: str, texts: list[tuple[int | None, str]]) -> None:
        # One at a time per user (a user's writes take turns on their lock anyway).
        for fact, text in texts:
            response = await stub.CreateMemory(
                pb.CreateMemoryRequest(user_id=user, content=text, gravity_score=0.5, embedding=padded(text)),
                metadata=metadata,
            )
            if fact is not None:
                evidence[(user, fact)] = response.memory.memory_id

    corpora = {}
    for user in QUALITY_USERS:
        texts: list[tuple[int | None, str]] = [(i, fact) for i, (fact, _) in enumerate(FACTS)]
        texts += [(None, rng.choice(CHATTER).format(**{k: rng.choice(v) for k, v in SLOTS.items()}))
                  for _ in range(CHATTER_PER_USER)]
        rng.shuffle(texts)
        corpora[user] = texts
    await asyncio.gather(*(load(user, texts) for user, texts in corpora.items()))
    hits = {"vector": 0, "text": 0, "hybrid": 0}
    for (user, fact), memory_id in evidence.items():
        question = FACTS[fact][1]
        requests = {
            "vector": pb.SearchMemoriesRequest(user_id=user, embedding=padded(question), top_k=10),
            "text": pb.SearchMemoriesRequest(user_id=user, query=question, top_k=10),
            "hybrid": pb.SearchMemoriesRequest(user_id=user, query=question, embedding=padded(question), top_k=10),
        }
        for mode, request in requests.items():
            response = await stub.SearchMemories(request, metadata=metadata)
            hits[mode] += memory_id in {r.memory.memory_id for r in response.results}
    print(f"retrieval quality, {len(evidence)} questions over {len(QUALITY_USERS)} users of "
          f"{len(FACTS) + CHATTER_PER_USER} memories, recall@10: "
          + "   ".join(f"{mode} {n / len(evidence):.2f}" for mode, n in hits.items()))


async def _list_figures(stub: memory_pb2_grpc.MemoryServiceAsyncStub, metadata: tuple[tuple[str, str], ...]) -> None:
    """The seed's example: one user, last 7 days, gravity >= 0.7, newest 50."""
    latencies = []
    for i in range(200):
        since = timestamp_pb2.Timestamp()
        since.FromDatetime(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=7))
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
        toggle_name = "ToggleResonance uniform (100k)"
        toggle = await measure(toggle_name, rpc_scenarios(channel, metadata)[toggle_name], duration, concurrency)
    print(toggle.line())
    print(f"{'CreateMemory streaming on / off':<42} {on.rps / off.rps:5.2f}  (goal >= 0.8)")
    print(f"{'CreateMemory (streams open) / ToggleResonance':<42} {on.rps / toggle.rps:5.2f}  (goal >= 0.4)")


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
        if server_pid and before is not None:
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
        await conn.execute(SETUP_SQL)  # the entries ToggleResonance reacts to
        await _load(conn, url)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            await _search_figures(stub, conn, metadata, "users of 10k (exact)", SMALL_USERS)
            await _search_figures(stub, conn, metadata, "one user of 100k (own IVFFlat)", [BIG_USER])
            await _text_figures(stub, conn, metadata, "users of 10k", SMALL_USERS)
            await _text_figures(stub, conn, metadata, "one user of 100k", [BIG_USER])
            await _quality_figures(stub, metadata)
            await _list_figures(stub, metadata)
    finally:
        await conn.close()
    await _delivery_figures(target, url, metadata, event_rate, duration)
    await _create_figures(target, metadata, duration, concurrency)
    await _idle_stream_figures(target, metadata, server_pid)

