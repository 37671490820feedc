"""The MemoryService and stream suite (``--suite memory``), one run.

Sizes below are for ``--scale 1`` (the README's run); ``--scale`` multiplies
them (a smoke run uses 0.01). Vectors have the configured ``embedding_dim``
(default 384, the README's figures).

- SearchMemories recall@10 against exact search, and latency, on 200k
  memories: ten users holding 10k each and one holding 100k, each searched
  through their own IVFFlat index when they hold more than
  ``search_exact_max_memories`` (built by the maintenance job after the load),
  exactly otherwise.
  Vectors are clustered (100 centres plus noise); contents are 6-20 words of a
  5000-word Zipf-like vocabulary, loaded in bulk.
- SearchMemories by text (BM25) and hybrid, p50/p99, on the same users.
- SearchMemories on real text: one user of 100k real English sentences
  (bench.corpus), embedded by wordllama, searched with 300 held-out sentences
  of the corpus: vector recall@10 against exact search (mean and worst
  query), and vector, text and hybrid latency.
- Retrieval quality on a small labelled set (facts among chatter, questions
  of 5-20 words that paraphrase them; users of about 3000 memories):
  recall@10 and latency of vector, text and hybrid search.
- Both with wordllama embeddings zero-padded to the configured dimension
  (cosine is unchanged by padding); skipped without the wordllama extra or
  below 256 dimensions.
- ListMemories with the seed's example filter, p50/p99.
- Delivery latency, commit -> client, with 1000 subscribers while events are
  written at a fixed rate (default 1000/s) straight into the database.
- CreateMemory throughput with no stream open, then with a stream open for
  every writing user (the ratio is the cost of streaming), then
  ToggleResonance in the same run: CreateMemory with streams / ToggleResonance.
- Resident memory of the server holding 10k idle streams (when its pid is known).
Every phase is bounded by --duration or by a fixed count. ``--suite search``
runs the search phases only.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import asyncpg
import grpc
import psutil
from google.protobuf import timestamp_pb2

from bench import corpus
from bench.core import BenchFailed, Report, measure, percentiles, progress
from bench.targets import Target
from bench.workload import WRITERS, Workload
from nexus import database
from nexus.config import Config
from nexus.constants import VECTOR_INDEX_LOCK_KEY
from nexus.embedder import Embedder, from_config
from nexus.maintenance import Maintenance
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

BIG_USER = "bench-mem-big"
REAL_USER = "bench-mem-real"
SMALL_USERS = [f"bench-mem-{n}" for n in range(10)]
STREAMS_PER_CHANNEL = 500
WORDLLAMA_DIM = 256


@dataclass(frozen=True)
class Sizes:
    per_small_user: int
    big_user: int
    search_queries: int
    live_subscribers: int
    idle_streams: int
    real_user: int

    @classmethod
    def scaled(cls, scale: float) -> Sizes:
        def n(full: int, least: int) -> int:
            return max(least, round(full * scale))

        return cls(per_small_user=n(10_000, 50), big_user=n(100_000, 100), search_queries=n(300, 10),
                   live_subscribers=n(1000, 10), idle_streams=n(10_000, 20), real_user=n(100_000, 100))

    @property
    def memories(self) -> int:
        return self.big_user + self.per_small_user * len(SMALL_USERS)


# A labelled set: facts (the evidence) among chatter, and questions of 5-20
# words that paraphrase the facts. Every quality user holds all the facts and
# their own chatter: everyday notes made from templates, and as many real
# sentences (bench.corpus) for a real vocabulary.
FACTS = [
    ("My daughter Emma started violin lessons in September",
     "What instrument did my daughter start learning to play at the beginning of the school year?"),
    ("I am allergic to peanuts so I always check food labels",
     "Do I have any food allergies I should tell the waiter about before ordering?"),
    ("We adopted a golden retriever puppy called Biscuit",
     "What is the name of the puppy we adopted a while ago?"),
    ("My brother Tom moved to Lisbon for a software job",
     "Which city did my brother move to when he got his new job?"),
    ("I ran my first marathon in Berlin last spring",
     "Have I ever completed a long-distance race, and if so where was it?"),
    ("Our wedding anniversary is on the twelfth of June",
     "When do my wife and I celebrate our wedding anniversary every year?"),
    ("I switched careers from accounting to nursing",
     "What did I work as before I became a nurse?"),
    ("My favourite dish is my grandmother's mushroom risotto",
     "What is the food I love most, the one my family used to cook for me?"),
    ("I have been learning Japanese on my commute",
     "Which foreign language have I been studying lately on the way to work?"),
    ("The doctor said my blood pressure is too high",
     "What health problem did my physician mention at my last checkup?"),
    ("We are saving money to buy a house near the coast",
     "What are we putting money aside for these days?"),
    ("My laptop broke so I bought a new one on sale",
     "Why did I have to get a new computer recently?"),
    ("I volunteer at the animal shelter every Saturday morning",
     "What do I do on Saturday mornings to help out in the community?"),
    ("My son Leo is afraid of the dark and sleeps with a nightlight",
     "What is my little boy scared of when he goes to bed at night?"),
    ("I quit smoking three years ago",
     "Do I still smoke cigarettes or did I manage to give up?"),
    ("Our team won the regional chess tournament",
     "Did our team win any competition or tournament this season?"),
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
QUALITY_USERS = 5
# Each question is asked this many times per mode for its latency (recall counts the first).
QUALITY_LATENCY_ROUNDS = 3
# Each quality user's chatter: this many made from the templates, as many sentences of the corpus.
CHATTER_PER_USER = 1500


# The row trigger that keeps each user's search statistics (count_search_length, db/functions/search.sql):
# per memory, an upsert of its user's memory_users row and its memory_terms
# rows. Loading a user's memories in one transaction that way updates one row
# n times (each update O(n): its versions cannot be pruned before the commit)
# and inserts the term rows one statement at a time: ~2000 s for the corpus.
# The load turns it off in its own transaction and fills the same statistics
# in bulk instead (FILL_SEARCH_STATISTICS).
SEARCH_STATISTICS_TRIGGER = "memories_search_length_counted"


def _load_sql(sizes: Sizes, dim: int) -> str:
    """Clustered vectors: 100 random centres, each memory a centre plus uniform noise."""
    return f"""
SET maintenance_work_mem = '1GB';
CREATE TEMP TABLE bench_centres AS
    SELECT c, array_agg(random() * 2 - 1 ORDER BY i)::real[] AS v
    FROM generate_series(1, 100) c, generate_series(1, {dim}) i GROUP BY c;
INSERT INTO memories (user_id, content, gravity_score, emotion_type, temporal_type, embedding, create_time)
SELECT CASE WHEN n <= {sizes.big_user} THEN '{BIG_USER}' ELSE 'bench-mem-' || (n % 10) END,
       (SELECT string_agg('w' || floor(power(random(), 3) * 5000)::int, ' ') FROM generate_series(1, 6 + n % 15)),
       random(), (ARRAY['joy', 'calm', 'fear', 'awe'])[1 + n % 4], 'present',
       (SELECT array_agg(ce.v[i] + (random() - 0.5) * 0.6 ORDER BY i) FROM generate_series(1, {dim}) i)::vector,
       now() - random() * interval '30 days'
FROM generate_series(1, {sizes.memories}) n
JOIN bench_centres ce ON ce.c = 1 + (hashint4(n) & 1023) % 100;
"""


# What SEARCH_STATISTICS_TRIGGER (and create_memory's memory_count) keep, for
# the loaded users at once: memory_terms and search_length_total as the trigger
# would have written them. The loaded users
# hold no other memories: the load runs only when the corpus is absent.
FILL_SEARCH_STATISTICS = """
INSERT INTO memory_terms (user_id, lexeme, memory_id, term_frequency, search_length)
SELECT m.user_id, t.lexeme, m.memory_id, cardinality(t.positions), m.search_length
FROM memories m CROSS JOIN LATERAL unnest(m.search_vector) t
WHERE m.user_id LIKE 'bench-mem-%';
INSERT INTO memory_users (user_id, memory_count, search_length_total)
SELECT user_id, count(*), sum(search_length) FROM memories WHERE user_id LIKE 'bench-mem-%' GROUP BY user_id
ON CONFLICT (user_id) DO UPDATE SET memory_count = EXCLUDED.memory_count,
                                    search_length_total = EXCLUDED.search_length_total;
"""

# The bench users whose statistics differ from a recount of their memories:
# (user, kept, recounted) with (memory_count, search_length_total, term rows,
# the rows' term frequencies summed (each memory's add up to its length), the
# rows' lengths summed (each memory's length once per lexeme)).
SEARCH_STATISTICS_OFF = """
SELECT c.user_id, array[u.memory_count, u.search_length_total, t.rows, t.frequencies, t.lengths]::bigint[] AS kept,
       array[c.memories, c.length_total, c.term_rows, c.length_total, c.term_lengths]::bigint[] AS recounted
FROM (SELECT user_id, count(*) AS memories, sum(search_length) AS length_total, sum(length(search_vector)) AS term_rows,
             sum(search_length * length(search_vector)) AS term_lengths
      FROM memories WHERE user_id = ANY ($1) GROUP BY user_id) c
LEFT JOIN memory_users u ON u.user_id = c.user_id
CROSS JOIN LATERAL (SELECT count(*) AS rows, sum(term_frequency) AS frequencies, sum(search_length) AS lengths
                    FROM memory_terms WHERE user_id = c.user_id) t
WHERE (u.memory_count, u.search_length_total, t.rows, t.frequencies, t.lengths)
      IS DISTINCT FROM (c.memories, c.length_total, c.term_rows, c.length_total, c.term_lengths)
"""


EXACT_TOP10 = """
SELECT array_agg(memory_id::text) FROM (
    SELECT memory_id FROM memories WHERE user_id = $1 ORDER BY embedding <=> $2 LIMIT 10) nearest
"""


@dataclass
class _Run:
    """One memory suite run: where it goes, how big, and where its lines go."""

    target: Target
    config: Config
    sizes: Sizes
    report: Report
    model: Embedder | None = None
    no_model: str = ""

    def __post_init__(self) -> None:
        if self.config.embedding_dim < WORDLLAMA_DIM:
            self.no_model = f"wordllama's {WORDLLAMA_DIM} dimensions do not fit in {self.config.embedding_dim}"
            return
        try:
            self.model = from_config("wordllama")
        except (ImportError, RuntimeError):
            self.no_model = "needs the wordllama extra"

    def padded(self, texts: list[str]) -> list[list[float]]:
        """The texts' wordllama embeddings zero-padded to the configured dimension (cosine is
        unchanged); a text without a token the model knows gets a fixed unit vector."""
        assert self.model is not None
        pad = [0.0] * (self.config.embedding_dim - self.model.dim)
        return [(vector or [1.0] + [0.0] * (self.model.dim - 1)) + pad for vector in self.model.embed_batch(texts)]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.target.metadata

    async def load(self, conn: asyncpg.Connection) -> None:
        """The search corpus (its search statistics filled in bulk, then checked against
        a recount), then the vector indexes the maintenance job builds for users above
        ``search_exact_max_memories``."""
        if not await conn.fetchval("SELECT count(*) FROM memories WHERE user_id = $1", BIG_USER):
            progress(f"loading {self.sizes.memories} memories of {self.config.embedding_dim} dimensions"
                     + (f" and {self.sizes.real_user} of real sentences" if self.model is not None else ""))
            started = time.perf_counter()
            # The server's maintenance builds no index meanwhile: its CREATE INDEX
            # CONCURRENTLY and the VACUUM below would wait for each other (a deadlock).
            await conn.execute("SELECT pg_advisory_lock($1)", VECTOR_INDEX_LOCK_KEY)
            try:
                async with conn.transaction():
                    await conn.execute(f"ALTER TABLE memories DISABLE TRIGGER {SEARCH_STATISTICS_TRIGGER}")
                    await conn.execute(_load_sql(self.sizes, self.config.embedding_dim))
                    if self.model is not None:
                        await self._load_real_user(conn)
                    await conn.execute(FILL_SEARCH_STATISTICS)
                    await conn.execute(f"ALTER TABLE memories ENABLE TRIGGER {SEARCH_STATISTICS_TRIGGER}")
                await conn.execute("VACUUM ANALYZE memories, memory_terms, memory_users")
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", VECTOR_INDEX_LOCK_KEY)
            self.report.add(f"loaded {self.sizes.memories} memories in {time.perf_counter() - started:.0f} s")
        await _check_search_statistics(conn)
        started = time.perf_counter()
        db = await database.Database.open(
            self.target.database_url, min_size=1, max_size=1, statement_timeout_ms=30_000, slow_warn_ms=10**9,
            slow_error_ms=10**9,
        )
        try:
            built = await Maintenance(db, self.config).maintain_vector_indexes()
        finally:
            await db.close()
        if built:
            self.report.add(f"maintenance built the vector index of {', '.join(built)} in "
                            f"{time.perf_counter() - started:.0f} s")

    async def _load_real_user(self, conn: asyncpg.Connection) -> None:
        """REAL_USER's memories: the corpus's first sentences, embedded by wordllama."""
        assert self.model is not None
        texts = corpus.take(0, self.sizes.real_user)
        vectors = await asyncio.to_thread(self.padded, texts)
        await conn.execute("CREATE TEMP TABLE bench_real (content text, v real[]) ON COMMIT DROP")
        await conn.copy_records_to_table("bench_real", records=list(zip(texts, vectors, strict=True)))
        await conn.execute(f"""
            INSERT INTO memories (user_id, content, gravity_score, emotion_type, temporal_type, embedding, create_time)
            SELECT '{REAL_USER}', content, random(), 'calm', 'present', v::vector, now() - random() * interval '30 days'
            FROM bench_real""")

    async def real_text_figures(self, stub: memory_pb2_grpc.MemoryServiceAsyncStub, conn: asyncpg.Connection) -> None:
        """REAL_USER searched with held-out sentences of the corpus (one call at a time):
        vector recall@10 against exact search and latency, then text and hybrid latency."""
        if self.model is None:
            self.report.add(f"search on real sentences: skipped ({self.no_model})")
            return
        label = f"real sentences, one user of {self.sizes.real_user} ({await self._searched_by(conn, [REAL_USER])})"
        progress(f"SearchMemories {label}")
        queries = corpus.take(self.sizes.real_user, self.sizes.search_queries)
        embeddings = self.padded(queries)
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
            exact = [set(await conn.fetchval(EXACT_TOP10, REAL_USER, embedding)) for embedding in embeddings]
        latencies: dict[str, list[float]] = {"vector": [], "text": [], "hybrid": []}
        recalls = []
        for query, embedding, truth in zip(queries, embeddings, exact, strict=True):
            requests = {
                "vector": pb.SearchMemoriesRequest(user_id=REAL_USER, embedding=embedding, top_k=10),
                "text": pb.SearchMemoriesRequest(user_id=REAL_USER, query=query, top_k=10),
                "hybrid": pb.SearchMemoriesRequest(user_id=REAL_USER, query=query, embedding=embedding, top_k=10),
            }
            for mode, request in requests.items():
                started = time.perf_counter()
                response = await stub.SearchMemories(request, metadata=self.metadata)
                latencies[mode].append(time.perf_counter() - started)
                if mode == "vector":
                    recalls.append(len({r.memory.memory_id for r in response.results} & truth) / 10)
        words = statistics.mean(len(query.split()) for query in queries)
        self.report.add(f"SearchMemories {label}, {len(queries)} held-out sentences of {words:.1f} words on average:")
        for mode, samples in latencies.items():
            p50, p99 = percentiles(samples)
            quality = (f"recall@10 {statistics.mean(recalls):.3f} (min {min(recalls):.1f})   " if mode == "vector"
                       else "")
            self.report.add(f"    {mode:<8} {quality}p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")

    async def search_figures(self, stub: memory_pb2_grpc.MemoryServiceAsyncStub, conn: asyncpg.Connection, label: str,
                             users: list[str]) -> None:
        """Recall@10 of SearchMemories against exact search, and its latency (one call at a time)."""
        label = f"{label} ({await self._searched_by(conn, users)})"
        progress(f"SearchMemories {label}")
        queries = await conn.fetch(
            "SELECT user_id, embedding AS v FROM memories WHERE user_id = ANY($1) ORDER BY random() LIMIT $2",
            users, self.sizes.search_queries,
        )
        # Each query is near, not on, a stored vector of its user.
        probes = [(q["user_id"], [x + random.uniform(-0.05, 0.05) for x in q["v"].to_list()]) for q in queries]
        latencies, recalls = [], []
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
            exact = [set(await conn.fetchval(EXACT_TOP10, user_id, probe)) for user_id, probe in probes]
        for (user_id, probe), truth in zip(probes, exact, strict=True):
            started = time.perf_counter()
            response = await stub.SearchMemories(
                pb.SearchMemoriesRequest(user_id=user_id, embedding=probe, top_k=10), metadata=self.metadata
            )
            latencies.append(time.perf_counter() - started)
            recalls.append(len({r.memory.memory_id for r in response.results} & truth) / 10)
        p50, p99 = percentiles(latencies)
        self.report.add(f"SearchMemories {label:<28} recall@10 {statistics.mean(recalls):.3f} (min {min(recalls):.1f})"
                        f"   p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")

    async def _searched_by(self, conn: asyncpg.Connection, users: list[str]) -> str:
        """How the server searches these users' vectors: "own IVFFlat" or "exact"."""
        indexed = await conn.fetchval(
            "SELECT count(*) FROM unnest($1::text[]) u WHERE memory_vector_index_usable(u, $2)",
            users, self.config.search_exact_max_memories,
        )
        if indexed not in (0, len(users)):
            raise BenchFailed(f"memory load: {indexed} of {len(users)} users have a usable vector index; expected all "
                              "or none")
        return "own IVFFlat" if indexed else "exact"

    async def text_figures(self, stub: memory_pb2_grpc.MemoryServiceAsyncStub, conn: asyncpg.Connection, label: str,
                           users: list[str]) -> None:
        """Text-only and hybrid latency (one call at a time): two or three words of
        a stored memory of the user as the query, a vector near it as the embedding."""
        progress(f"SearchMemories text and hybrid, {label}")
        rows = await conn.fetch(
            "SELECT user_id, content, embedding AS v FROM memories WHERE user_id = ANY($1)"
            " ORDER BY random() LIMIT $2",
            users, self.sizes.search_queries,
        )
        for mode in ("text", "hybrid"):
            latencies, found = [], 0
            for row in rows:
                words = row["content"].split()
                request = pb.SearchMemoriesRequest(
                    user_id=row["user_id"], top_k=10,
                    query=" ".join(random.sample(words, min(len(words), random.randint(2, 3)))),
                )
                if mode == "hybrid":
                    request.embedding.extend(x + random.uniform(-0.05, 0.05) for x in row["v"].to_list())
                started = time.perf_counter()
                response = await stub.SearchMemories(request, metadata=self.metadata)
                latencies.append(time.perf_counter() - started)
                found += len(response.results) == 10
            p50, p99 = percentiles(latencies)
            self.report.add(f"SearchMemories {mode + ' ' + label:<35} full pages {found}/{len(rows)}   "
                            f"p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")


    async def quality_figures(self, stub: memory_pb2_grpc.MemoryServiceAsyncStub) -> None:
        """Recall@10 of the fact each question paraphrases, per search mode."""
        if self.model is None:
            self.report.add(f"retrieval quality: skipped ({self.no_model})")
            return
        progress("retrieval quality on the labelled set")
        rng = random.Random(11)
        evidence: dict[tuple[str, int], str] = {}

        async def load(user: str, texts: list[tuple[int | None, str]]) -> None:
            # One at a time per user (a user's writes take turns on their lock anyway).
            vectors = self.padded([text for _, text in texts])
            for (fact, text), vector in zip(texts, vectors, strict=True):
                response = await stub.CreateMemory(
                    pb.CreateMemoryRequest(user_id=user, content=text, gravity_score=0.5, embedding=vector),
                    metadata=self.metadata,
                )
                if fact is not None:
                    evidence[(user, fact)] = response.memory.memory_id

        # Users of this run only: a reused --disposable-database keeps earlier runs' memories.
        run_id = uuid.uuid4().hex[:8]
        corpora = {}
        # From the corpus's end: the real-sentence user holds its beginning.
        real_chatter = corpus.take(-QUALITY_USERS * CHATTER_PER_USER, QUALITY_USERS * CHATTER_PER_USER)
        for n, user in enumerate(f"bench-quality-{run_id}-{n}" for n in range(QUALITY_USERS)):
            texts: list[tuple[int | None, str]] = [(i, fact) for i, (fact, _) in enumerate(FACTS)]
            texts += [(None, rng.choice(CHATTER).format(**{k: rng.choice(v) for k, v in SLOTS.items()}))
                      for _ in range(CHATTER_PER_USER)]
            texts += [(None, text) for text in real_chatter[n * CHATTER_PER_USER:(n + 1) * CHATTER_PER_USER]]
            rng.shuffle(texts)
            corpora[user] = texts
        await asyncio.gather(*(load(user, texts) for user, texts in corpora.items()))
        hits = {"vector": 0, "text": 0, "hybrid": 0}
        latencies: dict[str, list[float]] = {mode: [] for mode in hits}
        for (user, fact), memory_id in evidence.items():
            question = FACTS[fact][1]
            (embedding,) = self.padded([question])
            requests = {
                "vector": pb.SearchMemoriesRequest(user_id=user, embedding=embedding, top_k=10),
                "text": pb.SearchMemoriesRequest(user_id=user, query=question, top_k=10),
                "hybrid": pb.SearchMemoriesRequest(user_id=user, query=question, embedding=embedding, top_k=10),
            }
            for mode, request in requests.items():
                for round_ in range(QUALITY_LATENCY_ROUNDS):
                    started = time.perf_counter()
                    response = await stub.SearchMemories(request, metadata=self.metadata)
                    latencies[mode].append(time.perf_counter() - started)
                    if round_ == 0:
                        hits[mode] += memory_id in {r.memory.memory_id for r in response.results}
        self.report.add(
            f"retrieval quality, {len(evidence)} questions over {QUALITY_USERS} users of "
            f"{len(FACTS) + 2 * CHATTER_PER_USER} memories, recall@10: "
            + "   ".join(f"{mode} {n / len(evidence):.2f}" for mode, n in hits.items())
        )
        for mode, samples in latencies.items():
            p50, p99 = percentiles(samples)
            self.report.add(f"SearchMemories {mode + ', users of ' + str(len(FACTS) + 2 * CHATTER_PER_USER):<35} "
                            f"(labelled set, {len(samples)} calls)   p50 {p50 * 1000:6.2f} ms   p99 {p99 * 1000:6.2f} ms")

    async def list_figures(self, stub: memory_pb2_grpc.MemoryServiceAsyncStub) -> None:
        """The seed's example: one user, last 7 days, gravity >= 0.7, newest 50."""
        progress("ListMemories")
        latencies = []
        for i in range(200):
            since = timestamp_pb2.Timestamp()
            since.FromDatetime(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=7))
            started = time.perf_counter()
            await stub.ListMemories(
                pb.ListMemoriesRequest(user_id=SMALL_USERS[i % len(SMALL_USERS)] if i % 2 else BIG_USER, since=since,
                                       min_gravity=0.7, page_size=50),
                metadata=self.metadata,
            )
            latencies.append(time.perf_counter() - started)
        p50, p99 = percentiles(latencies)
        self.report.add(f"ListMemories seed filter (7 days, >= 0.7, 50)  p50 {p50 * 1000:6.2f} ms   "
                        f"p99 {p99 * 1000:6.2f} ms  (RPC)")

    async def delivery_figures(self, rate: int, duration: float) -> None:
        """Latency from the event's commit to its arrival, while writes are paced at ``rate``/s."""
        subscribers = self.sizes.live_subscribers
        progress(f"delivery to {subscribers} subscribers, {rate} events/s")
        users = [f"bench-live-{n}" for n in range(subscribers)]
        channels, calls = await _open_streams(self.target.address, self.metadata, users)
        latencies: list[float] = []

        async def receive(call: grpc.aio.UnaryStreamCall) -> None:
            async for event in call:
                latencies.append(time.time() - event.event_time.ToNanoseconds() / 1e9)

        readers = [asyncio.create_task(receive(call)) for call in calls]
        pool = await asyncpg.create_pool(self.target.database_url, min_size=8, max_size=8)
        written = 0
        try:
            began = time.perf_counter()
            interval = 1 / rate
            in_flight: set[asyncio.Task[str]] = set()
            while (now := time.perf_counter()) < began + duration:
                due = int((now - began) / interval) + 1
                for n in range(written, due):
                    task = asyncio.create_task(pool.execute(
                        "SELECT create_memory($1, 'bench live', NULL, NULL, NULL, 0.5, NULL, '{}', '{}', NULL, NULL,"
                        " NULL)",
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
        self.report.add(f"delivery commit -> client, {subscribers} subscribers, {written / elapsed:.0f} events/s "
                        f"written: received {len(latencies)}/{written}   p50 {p50 * 1000:6.2f} ms   "
                        f"p99 {p99 * 1000:6.2f} ms")

    async def create_figures(self, workload: Workload, duration: float, concurrency: int) -> None:
        """CreateMemory without, then with, a stream per writing user; then ToggleResonance."""
        users = [f"bench-writer-{n}" for n in range(1, WRITERS + 1)]
        processes = self.target.processes
        async with grpc.aio.insecure_channel(self.target.address) as channel:
            create = workload.create_memory(channel, self.metadata)
            off = await measure("CreateMemory, no streams", create, duration, concurrency, processes)
            self.report.add(off.line())
            channels, calls = await _open_streams(self.target.address, self.metadata, users)
            drained = [0]

            async def drain(call: grpc.aio.UnaryStreamCall) -> None:
                async for _ in call:
                    drained[0] += 1

            readers = [asyncio.create_task(drain(call)) for call in calls]
            try:
                on = await measure(f"CreateMemory, {len(users)} streams open", create, duration, concurrency, processes)
            finally:
                try:
                    await _stop_readers("CreateMemory with streams open", readers)
                finally:
                    await _close_streams(channels, calls)
            self.report.add(on.line() + f"   events streamed {drained[0]}")
            name = "ToggleResonance uniform"
            toggle = await measure(name, workload.rpc_scenarios(channel, self.metadata)[name], duration, concurrency,
                                   processes)
        self.report.add(toggle.line())
        self.report.add(f"{'CreateMemory streaming on / off':<46} {on.rps / off.rps:5.2f}  (goal >= 0.8)")
        self.report.add(f"{'CreateMemory (streams open) / ToggleResonance':<46} {on.rps / toggle.rps:5.2f}  "
                        "(goal >= 0.4)")

    async def idle_stream_figures(self) -> None:
        count = self.sizes.idle_streams
        progress(f"{count} idle streams")
        server_pid = self.target.processes.server_pid
        before = _rss_mib(server_pid) if server_pid else None
        started = time.perf_counter()
        channels, calls = await _open_streams(self.target.address, self.metadata,
                                              [f"bench-idle-{n}" for n in range(count)])
        opened = time.perf_counter() - started
        try:
            await asyncio.sleep(2)  # let the server settle before reading its memory (no assertion on time)
            if server_pid and before is not None:
                after = _rss_mib(server_pid)
                self.report.add(f"{count} idle streams opened in {opened:.1f} s: server RSS {before:.0f} -> "
                                f"{after:.0f} MiB ({(after - before) * 1024 / count:.1f} KiB per stream; "
                                "goal total <= 1024 MiB at 10k)")
            else:
                self.report.add(f"{count} idle streams opened in {opened:.1f} s (pass --server-pid for the server's RSS)")
        finally:
            await _close_streams(channels, calls)


async def _check_search_statistics(conn: asyncpg.Connection) -> None:
    """Fails the run unless the bench users' search statistics equal a recount of
    their memories (the load fills them in bulk; search figures depend on them)."""
    off = await conn.fetch(SEARCH_STATISTICS_OFF, [BIG_USER, REAL_USER, *SMALL_USERS])
    if off:
        details = "; ".join(f"{r['user_id']} {list(r['kept'])} != {list(r['recounted'])}" for r in off)
        raise BenchFailed("memory load: search statistics (memory_count, search_length_total, memory_terms rows, "
                          "their term frequencies' sum, their lengths' sum) "
                          f"differ from a recount: {details}")


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


def _rss_mib(pid: int) -> float:
    """The server's resident memory: its process and its workers' (``nexus serve --workers``)."""
    server = psutil.Process(pid)
    return sum(p.memory_info().rss for p in (server, *server.children(recursive=True))) / 2**20


async def run_memory(
    target: Target, config: Config, workload: Workload, scale: float, duration: float, concurrency: int,
    event_rate: int, report: Report, search_only: bool = False,
) -> None:
    run = _Run(target, config, Sizes.scaled(scale), report)
    conn = await database.connect(target.database_url)
    try:
        await run.load(conn)
        async with grpc.aio.insecure_channel(target.address) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            small, big = f"users of {run.sizes.per_small_user}", f"one user of {run.sizes.big_user}"
            await run.search_figures(stub, conn, small, SMALL_USERS)
            await run.search_figures(stub, conn, big, [BIG_USER])
            await run.text_figures(stub, conn, small, SMALL_USERS)
            await run.text_figures(stub, conn, big, [BIG_USER])
            await run.real_text_figures(stub, conn)
            await run.quality_figures(stub)
            if search_only:
                return
            await run.list_figures(stub)
    finally:
        await conn.close()
    await workload.load(target.database_url)  # the entries ToggleResonance reacts to
    await run.delivery_figures(event_rate, duration)
    await run.create_figures(workload, duration, concurrency)
    await run.idle_stream_figures()
