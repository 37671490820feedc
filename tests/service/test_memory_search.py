"""MemoryService.SearchMemories by embedding: the caller's memories only,
nearest first, for both metrics; recall against an exact search computed in
SQL with index scans off — 1.0 on the exact path (users up to
search_exact_max_memories, and L2 searches), >= 0.95 through a large user's own
IVFFlat index (built by maintenance, cosine); filters (min_gravity, since, emotion_type)
applied before the limit on both paths, so a selective filter still yields
top_k matches; top_k and embedding validation; memories without embeddings
never returned; and the embedding dimension fixed by the first migration."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from nexus import database
from nexus.migrations import MigrationError, migrate
from nexus.server import NexusServer
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

from support.databases import backend_database, scratch_database
from support.rpc import SERVICE, Clients, auth, bad_request_fields, rpc_error
from support.servers import maintenance_runner, server_config, serving
from support.vectors import create, distance, f32, random_vector

pytestmark = pytest.mark.cluster

DIM = 384
COSINE, L2 = pb.DISTANCE_METRIC_COSINE, pb.DISTANCE_METRIC_L2
SQL_OPERATORS = {COSINE: "<=>", L2: "<->"}

# --- helpers ------------------------------------------------------------------


def timestamp(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def search(
    stub: memory_pb2_grpc.MemoryServiceStub, user: str, embedding: Sequence[float], metadata: Any = None, **fields: Any
) -> list[pb.SearchResult]:
    request = pb.SearchMemoriesRequest(user_id=user, embedding=embedding, **fields)
    return list((await stub.SearchMemories(request, metadata=metadata or auth(user))).results)


async def exact_nearest(
    conn: asyncpg.Connection,
    user: str,
    query: Sequence[float],
    top_k: int = 10,
    metric: int = COSINE,
    min_gravity: float = 0.0,
    since: datetime.datetime | None = None,
    emotion_type: str | None = None,
) -> list[tuple[str, float]]:
    """The true answer: (memory_id, distance) nearest first, by a sequential
    scan (conn has index scans disabled, see exact_connection)."""
    rows = await conn.fetch(
        f"""SELECT memory_id::text AS id, embedding {SQL_OPERATORS[metric]} $2::vector AS d
            FROM memories
            WHERE user_id = $1 AND embedding IS NOT NULL AND gravity_score >= $3
              AND ($4::timestamptz IS NULL OR create_time >= $4) AND ($5::text IS NULL OR emotion_type = $5)
            ORDER BY d, memory_id LIMIT $6""",
        user, query, min_gravity, since, emotion_type, top_k,
    )  # fmt: skip
    return [(r["id"], r["d"]) for r in rows]


@contextlib.asynccontextmanager
async def exact_connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await database.connect(url)
    try:
        await conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
        yield conn
    finally:
        await conn.close()


def assert_nearest_first(results: list[pb.SearchResult]) -> None:
    distances = [r.distance for r in results]
    assert distances == sorted(distances), distances


def recall(got: list[pb.SearchResult], exact: list[tuple[str, float]]) -> float:
    return len({r.memory.memory_id for r in got} & {i for i, _ in exact}) / len(exact)


def assert_true_distances(got: list[pb.SearchResult], truth: dict[str, float]) -> None:
    for r in got:
        assert r.distance == pytest.approx(truth[r.memory.memory_id], rel=1e-5, abs=1e-6)


# --- the caller's memories, nearest first -------------------------------------


async def test_search_returns_only_the_callers_memories_nearest_first_for_both_metrics(clients: Clients) -> None:
    rng = random.Random(7)
    stub = clients.memories
    query = random_vector(rng)
    # Varied lengths, so cosine and L2 disagree on the order.
    mine = [f32([x * rng.uniform(0.1, 10) for x in random_vector(rng)]) for _ in range(30)]
    created = await asyncio.gather(*(create(stub, "alice", f"memory {i}", v) for i, v in enumerate(mine)))
    await asyncio.gather(*(create(stub, "alice", f"no embedding {i}") for i in range(3)))
    # Bob's memories are exactly the query: they would come first if they leaked.
    await asyncio.gather(*(create(stub, "bob", f"bob {i}", query) for i in range(10)))
    vectors = {m.memory_id: v for m, v in zip(created, mine, strict=True)}

    orders = {}
    for metric in (pb.DISTANCE_METRIC_UNSPECIFIED, COSINE, L2):
        results = await search(stub, "alice", query, top_k=100, metric=metric)
        assert {r.memory.user_id for r in results} == {"alice"}
        assert {r.memory.memory_id for r in results} == set(vectors)  # no memory without an embedding
        assert_nearest_first(results)
        truth = {i: distance(query, v, metric or COSINE) for i, v in vectors.items()}
        assert_true_distances(results, truth)
        orders[metric] = [r.memory.memory_id for r in results]
        assert orders[metric] == sorted(truth, key=truth.__getitem__)
        assert not any(r.memory.embedding for r in results)

    assert orders[pb.DISTANCE_METRIC_UNSPECIFIED] == orders[COSINE]  # cosine is the default
    assert orders[COSINE] != orders[L2]


async def test_top_k_zero_means_ten_and_limits_the_nearest(clients: Clients) -> None:
    rng = random.Random(8)
    stub = clients.memories
    await asyncio.gather(*(create(stub, "alice", f"m{i}", random_vector(rng)) for i in range(25)))
    query = random_vector(rng)

    everything = await search(stub, "alice", query, top_k=1000)
    default = await search(stub, "alice", query)
    three = await search(stub, "alice", query, top_k=3)

    assert len(everything) == 25
    assert [r.memory.memory_id for r in default] == [r.memory.memory_id for r in everything[:10]]
    assert [r.memory.memory_id for r in three] == [r.memory.memory_id for r in everything[:3]]


async def test_a_user_without_embedded_memories_gets_no_results(clients: Clients) -> None:
    stub = clients.memories
    await asyncio.gather(*(create(stub, "carol", f"plain {i}") for i in range(5)))
    await create(stub, "dave", "dave's", random_vector(random.Random(9)))

    assert await search(stub, "carol", random_vector(random.Random(10))) == []
    assert await search(stub, "nobody", random_vector(random.Random(11)), metadata=SERVICE) == []


async def test_a_service_may_search_for_any_user_and_a_user_only_for_themselves(clients: Clients) -> None:
    stub = clients.memories
    vector = random_vector(random.Random(12))
    memory = await create(stub, "alice", "alice's", vector)

    assert [r.memory.memory_id for r in await search(stub, "alice", vector, metadata=SERVICE)] == [memory.memory_id]
    error = await rpc_error(search(stub, "alice", vector, metadata=auth("mallory")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# --- validation -------------------------------------------------------------------

GOOD = random_vector(random.Random(13))


@pytest.mark.refused_in_python
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param(dict(top_k=1001), "top_k", id="top_k-1001"),
        pytest.param(dict(top_k=-1), "top_k", id="top_k-negative"),
        pytest.param(dict(top_k=-(2**31)), "top_k", id="top_k-int32-min"),
        pytest.param(dict(embedding=GOOD[:-1]), "embedding", id="embedding-383"),
        pytest.param(dict(embedding=GOOD + [1.0]), "embedding", id="embedding-385"),
        pytest.param(dict(embedding=[1.0] * 8), "embedding", id="embedding-8"),
        pytest.param(dict(embedding=GOOD[:5] + [math.nan] + GOOD[6:]), "embedding", id="embedding-nan"),
        pytest.param(dict(embedding=GOOD[:5] + [math.inf] + GOOD[6:]), "embedding", id="embedding-inf"),
        pytest.param(dict(embedding=[0.0] * DIM), "embedding", id="embedding-zeros"),
        pytest.param(dict(embedding=[]), "query", id="neither-query-nor-embedding"),
        pytest.param(dict(embedding=[], query="  "), "query", id="blank-query-and-no-embedding"),
        pytest.param(dict(query="x" * 1001), "query", id="query-1001-chars"),
        pytest.param(dict(query="a\x00b"), "query", id="query-nul"),
        pytest.param(dict(recency_weight=1.5), "recency_weight", id="recency_weight-above-1"),
        pytest.param(dict(gravity_weight=-0.1), "gravity_weight", id="gravity_weight-negative"),
        pytest.param(dict(recency_weight=math.nan), "recency_weight", id="recency_weight-nan"),
        pytest.param(dict(recency_weight=0.6, gravity_weight=0.6), "gravity_weight", id="weights-above-1-together"),
        pytest.param(dict(metric=7), "metric", id="metric-unknown"),
        pytest.param(dict(min_gravity=1.5), "min_gravity", id="min_gravity-above-1"),
        pytest.param(dict(emotion_type="Joy"), "emotion_type", id="emotion_type-not-lowercase"),
    ],
)
async def test_bad_search_arguments_are_invalid_argument(clients: Clients, fields: dict[str, Any], field: str) -> None:
    await create(clients.memories, "alice", "something", GOOD)
    request = pb.SearchMemoriesRequest(user_id="alice", embedding=fields.pop("embedding", GOOD), **fields)

    error = await rpc_error(clients.memories.SearchMemories(request, metadata=auth("alice")))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [field]


# --- recall against the exact answer, on a corpus of a few thousand memories ---

BIG = "big"
SMALL_USERS = ["u1", "u2", "u3", "u4"]
SELECTIVE = 12  # embedded matches of each selective filter among BIG's memories


@dataclass
class Corpus:
    url: str
    centers: list[list[float]]
    since: datetime.datetime  # only BIG's SELECTIVE "recent" memories are this new
    rare_ids: set[str]  # BIG's embedded memories of emotion 'rare'
    strong_ids: set[str]  # BIG's embedded memories of gravity >= 0.95
    recent_ids: set[str]
    unembedded_ids: set[str]

    def query(self, rng: random.Random) -> list[float]:
        return random_vector(rng, center=rng.choice(self.centers), spread=0.7)


def vector_text(vector: Sequence[float]) -> str:
    """pgvector's text form; repr of a float32 value parses back to exactly it."""
    return "[" + ",".join(repr(x) for x in vector) + "]"


async def bulk_create(conn: asyncpg.Connection, rows: list[tuple[str, str, float, str | None, list[float]]]) -> list[str]:
    """Creates memories through the stored function create_memory (the insert
    rules, counts and events apply), all in one statement. The vectors go as
    pgvector's text form: the connection's vector codec does not extend to
    arrays of vectors."""
    users, contents, gravities, emotions, vectors = zip(*rows, strict=True)
    created = await conn.fetch(
        """SELECT create_memory(u, c, NULL, NULL, NULL, g, e, '{}', '{}', 'present', v::vector, NULL)
                  ->> 'memory_id'
           FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[]) AS r(u, c, g, e, v)""",
        users, contents, gravities, emotions, [vector_text(v) for v in vectors],
    )  # fmt: skip
    return [r[0] for r in created]


# Above this many memories a user is searched through their own index (BIG is).
INDEXED_ABOVE = 1000


@pytest.fixture(scope="module")
async def corpus(admin_url: str, template_db: str) -> AsyncIterator[Corpus]:
    """One database for the recall tests (they only read it): BIG holds 1500
    bulk memories plus some made through the RPC, four other users 250 each,
    all clustered around 24 centers (as real embeddings are). Maintenance has
    built BIG's own vector index (BIG is above INDEXED_ABOVE, nobody else is)."""
    async with backend_database(admin_url, template_db, "nexus_search_corpus") as url:
        rng = random.Random(2024)
        centers = [[rng.gauss(0, 1) for _ in range(DIM)] for _ in range(24)]

        def embedding() -> list[float]:
            return random_vector(rng, center=rng.choice(centers), spread=0.7)

        def row(user: str, i: int, gravity: float, emotion: str | None) -> tuple[str, str, float, str | None, list[float]]:
            return user, f"{user} memory {i}", gravity, emotion, embedding()

        ordinary = [row(BIG, i, rng.uniform(0, 0.79), rng.choice([None, "joy", "calm"])) for i in range(1500 - 2 * SELECTIVE)]
        # Half of the rare ones have gravity >= 0.5, for a filter matching fewer than top_k.
        rare = [row(BIG, i, 0.6 if i % 2 else 0.2, "rare") for i in range(SELECTIVE)]
        strong = [row(BIG, i, rng.uniform(0.95, 1.0), None) for i in range(SELECTIVE)]
        others = [row(u, i, rng.uniform(0, 0.79), rng.choice([None, "rare", "joy"])) for u in SMALL_USERS for i in range(250)]
        conn = await database.connect(url)
        try:
            ids = await bulk_create(conn, ordinary + rare + strong + others)
            rare_ids = set(ids[len(ordinary) : len(ordinary) + SELECTIVE])
            strong_ids = set(ids[len(ordinary) + SELECTIVE : len(ordinary) + 2 * SELECTIVE])
            async with serving(url) as stub:
                await asyncio.gather(*(create(stub, "u1", f"rpc {i}", embedding()) for i in range(10)))
                # Matching every filter but without an embedding: never returned.
                unembedded = await asyncio.gather(
                    *(create(stub, BIG, f"plain {i}", gravity_score=0.99, emotion_type="rare") for i in range(5))
                )
                since = await conn.fetchval("SELECT clock_timestamp()")
                recent = await asyncio.gather(
                    *(create(stub, BIG, f"recent {i}", embedding(), gravity_score=0.3) for i in range(SELECTIVE))
                )
            await conn.execute("ANALYZE memories")
            async with serving(url, search_exact_max_memories=INDEXED_ABOVE, build_indexes=[BIG]):
                pass
        finally:
            await conn.close()
        yield Corpus(
            url, centers, since, rare_ids, strong_ids, {m.memory_id for m in recent}, {m.memory_id for m in unembedded}
        )


async def test_exact_path_has_perfect_recall_for_every_user(corpus: Corpus) -> None:
    rng = random.Random(1)
    async with serving(corpus.url, search_exact_max_memories=10_000) as stub, exact_connection(corpus.url) as conn:
        for user, metric in itertools.product([BIG, *SMALL_USERS], (COSINE, L2)):
            for _ in range(4):
                query = corpus.query(rng)
                got = await search(stub, user, query, metadata=SERVICE, metric=metric)
                exact = await exact_nearest(conn, user, query, metric=metric)
                assert [r.memory.memory_id for r in got] == [i for i, _ in exact], (user, metric)
                assert_true_distances(got, dict(exact))


async def index_scans(conn: asyncpg.Connection) -> int:
    """Scans of BIG's own vector index (the only one)."""
    return await conn.fetchval(
        "SELECT sum(idx_scan) FROM pg_stat_user_indexes WHERE indexrelname = memory_vector_index_name($1)", BIG
    )


async def wait_for_index_scans(conn: asyncpg.Connection, before: int) -> None:
    """The searches really went through the user's own index (backends publish their
    statistics within seconds)."""
    async with asyncio.timeout(20):
        while await index_scans(conn) == before:
            await asyncio.sleep(0.1)


async def plain_filtered_index_scan(conn: asyncpg.Connection, user: str, query: Sequence[float], emotion_type: str) -> int:
    """How many of the 10 asked for a filtered scan of the user's index
    without pgvector's iterative scan finds: the filter runs on the rows of
    the probed lists only."""
    async with conn.transaction():
        await conn.execute(
            "SET LOCAL enable_indexscan = on; SET LOCAL enable_sort = off; "
            "SET LOCAL ivfflat.iterative_scan = off; SET LOCAL ivfflat.probes = 1"
        )
        return len(
            await conn.fetch(
                f"""SELECT memory_id FROM memories WHERE user_id = '{user}' AND emotion_type = $2
                    ORDER BY embedding::halfvec({DIM}) <=> $1::halfvec({DIM}) LIMIT 10""",
                query, emotion_type,
            )  # fmt: skip
        )


OWN_INDEX_ON_ONE_SERVER = pytest.mark.single_node(
    "counts scans of the user's own index and plans a filtered scan in the one server's catalogs; on the cluster "
    "the index and its statistics are per shard on the workers"
)


@OWN_INDEX_ON_ONE_SERVER
async def test_own_index_recall_at_10_is_at_least_point_95_and_l2_stays_exact(corpus: Corpus) -> None:
    rng = random.Random(2)
    async with serving(corpus.url, search_exact_max_memories=INDEXED_ABOVE) as stub, exact_connection(corpus.url) as conn:
        scans_before = await index_scans(conn)
        recalls = []
        for _ in range(20):
            query = corpus.query(rng)
            got = await search(stub, BIG, query, metadata=SERVICE)
            truth = await exact_nearest(conn, BIG, query, top_k=2000)
            assert len(got) == 10
            assert {r.memory.user_id for r in got} == {BIG}
            assert_nearest_first(got)
            assert_true_distances(got, dict(truth))
            recalls.append(recall(got, truth[:10]))
        assert sum(recalls) / len(recalls) >= 0.95, recalls
        await wait_for_index_scans(conn, scans_before)
        # The index is cosine only: L2 searches of the same user are exact.
        for _ in range(3):
            query = corpus.query(rng)
            got = await search(stub, BIG, query, metadata=SERVICE, metric=L2)
            assert [r.memory.memory_id for r in got] == [i for i, _ in await exact_nearest(conn, BIG, query, metric=L2)]


@pytest.mark.parametrize(
    "indexed", [False, pytest.param(True, marks=OWN_INDEX_ON_ONE_SERVER)], ids=["exact-path", "own-index-path"]
)
async def test_filters_apply_before_the_limit(corpus: Corpus, indexed: bool) -> None:
    """Each filter matches SELECTIVE (12) of BIG's ~1500 memories: top_k=10
    must still bring 10, all matching (a plain filtered index scan brings fewer)."""
    rng = random.Random(3)
    filters: list[tuple[dict[str, Any], set[str]]] = [
        (dict(emotion_type="rare"), corpus.rare_ids),
        (dict(min_gravity=0.95), corpus.strong_ids),
        (dict(since=corpus.since), corpus.recent_ids),
    ]
    exact_max = INDEXED_ABOVE if indexed else 10_000
    async with serving(corpus.url, search_exact_max_memories=exact_max) as stub, exact_connection(corpus.url) as conn:
        scans_before = await index_scans(conn)
        for (fields, matching), metric in itertools.product(filters, (COSINE, L2)):
            for _ in range(3):
                query = corpus.query(rng)
                request_fields = {k: timestamp(v) if k == "since" else v for k, v in fields.items()}
                got = await search(stub, BIG, query, metadata=SERVICE, metric=metric, **request_fields)
                truth = await exact_nearest(conn, BIG, query, top_k=50, metric=metric, **fields)
                assert {i for i, _ in truth} == matching
                assert len(got) == 10, fields
                assert {r.memory.memory_id for r in got} <= matching, fields
                assert_nearest_first(got)
                assert_true_distances(got, dict(truth))
                if not indexed:
                    assert [r.memory.memory_id for r in got] == [i for i, _ in truth[:10]]
                elif "emotion_type" in fields and metric == COSINE:  # the trap this avoids
                    assert await plain_filtered_index_scan(conn, BIG, query, fields["emotion_type"]) < 10

        # Fewer matches than top_k (6 rare memories of gravity >= 0.5): all of them.
        query = corpus.query(rng)
        got = await search(stub, BIG, query, metadata=SERVICE, emotion_type="rare", min_gravity=0.5)
        exact = await exact_nearest(conn, BIG, query, emotion_type="rare", min_gravity=0.5)
        assert len(exact) == SELECTIVE // 2
        assert [r.memory.memory_id for r in got] == [i for i, _ in exact]

        # Only memories without an embedding are this strong and rare: nothing.
        assert await search(stub, BIG, corpus.query(rng), metadata=SERVICE, emotion_type="rare", min_gravity=0.98) == []
        # Enough to hold every embedded memory but not the unembedded ones.
        everything = await search(stub, BIG, corpus.query(rng), metadata=SERVICE, top_k=1000)
        assert len(everything) == 1000
        assert not {r.memory.memory_id for r in everything} & corpus.unembedded_ids
        if indexed:
            await wait_for_index_scans(conn, scans_before)


# --- the embedding dimension -------------------------------------------------------


async def test_embedding_dimension_is_fixed_by_the_first_migration(pg_admin_url: str) -> None:
    async with scratch_database(pg_admin_url, "nexus_dim8", embedding_dim=8) as url:
        conn = await database.connect(url)
        try:
            assert await conn.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'memories'::regclass AND attname = 'embedding'"
            ) == "vector(8)"

            async with serving(url, embedding_dim=8) as stub:
                memory = await create(stub, "alice", "eight", [float(i + 1) for i in range(8)])
                got = await search(stub, "alice", [1.0] * 8)
                assert [r.memory.memory_id for r in got] == [memory.memory_id]
                for wrong in ([1.0] * DIM, [1.0] * 7):
                    error = await rpc_error(create(stub, "alice", "wrong", wrong))
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert bad_request_fields(error) == ["embedding"]
            assert await conn.fetchval("SELECT count(*) FROM memories") == 1

            with pytest.raises(MigrationError, match="8-dimensional"):
                await migrate(conn, embedding_dim=DIM)
            with pytest.raises(MigrationError):
                await NexusServer(server_config(url)).start()  # the default, 384
        finally:
            await conn.close()


# --- the vector-index job ----------------------------------------------------------


async def index_lists(conn: asyncpg.Connection, user: str) -> int | None:
    """The lists of the user's index when it is valid; None when there is none usable."""
    return await conn.fetchval(
        """SELECT o.option_value::int FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid,
                  pg_options_to_table(c.reloptions) o
           WHERE i.indexrelid = to_regclass(memory_vector_index_name($1)) AND i.indisvalid AND o.option_name = 'lists'""",
        user,
    )


async def test_maintenance_builds_rebuilds_and_repairs_the_users_own_index(db_url: str) -> None:
    rng = random.Random(31)
    conn = await database.connect(db_url)
    try:
        await bulk_create(conn, [("big", f"m{i}", 0.5, None, random_vector(rng)) for i in range(30)])
        await bulk_create(conn, [("small", f"m{i}", 0.5, None, random_vector(rng)) for i in range(10)])
        server = NexusServer(server_config(db_url, search_exact_max_memories=10))
        await server.start()
        try:
            assert server.maintenance is not None
            job = server.maintenance.maintain_vector_indexes
            assert await job() == ["big"]  # "small" has 10, not more
            assert await index_lists(conn, "big") == 6  # ceil(sqrt(30))
            assert await index_lists(conn, "small") is None
            assert await job() == []  # nothing due

            # Outgrown: more than 4 x 6^2 memories -> new lists, same index name.
            await bulk_create(conn, [("big", f"n{i}", 0.5, None, random_vector(rng)) for i in range(120)])
            assert await job() == ["big"]
            assert await index_lists(conn, "big") == 13  # ceil(sqrt(150))

            # The remains of a failed concurrent build are dropped and built again.
            await conn.execute(
                "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(memory_vector_index_name('big'))"
            )
            assert await index_lists(conn, "big") is None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = memory_pb2_grpc.MemoryServiceStub(channel)
                query = random_vector(rng)
                async with exact_connection(db_url) as exact:
                    truth = [i for i, _ in await exact_nearest(exact, "big", query)]
                    # Meanwhile the user is searched exactly.
                    assert [r.memory.memory_id for r in await search(stub, "big", query, metadata=SERVICE)] == truth
                    assert await job() == ["big"]
                    assert await index_lists(conn, "big") == 13
                    got = await search(stub, "big", query, metadata=SERVICE)
                    assert recall(got, await exact_nearest(exact, "big", query)) >= 0.8
        finally:
            await server.stop(grace=0)
    finally:
        await conn.close()


async def test_maintenance_indexes_only_the_largest_users(db_url: str) -> None:
    """vector_index_max_users caps the per-user indexes (each costs every query and
    write on memories): the largest users get them, a user who has one keeps it
    until someone else is 25% larger (no swapping run after run at the edge),
    and a user who loses it is searched exactly again. Only user indexes on
    memories are dropped, and the remains of a failed concurrent reindex with
    them (the reindex is then done again); a user at or below 80% of the
    threshold loses theirs."""
    rng = random.Random(37)
    conn = await database.connect(db_url)
    try:
        await bulk_create(conn, [("first", f"m{i}", 0.5, None, random_vector(rng)) for i in range(30)])
        await bulk_create(conn, [("second", f"m{i}", 0.5, None, random_vector(rng)) for i in range(20)])
        server = NexusServer(server_config(db_url, search_exact_max_memories=10, vector_index_max_users=1))
        await server.start()
        try:
            assert server.maintenance is not None
            job = server.maintenance.maintain_vector_indexes
            assert await job() == ["first"]
            assert (await index_lists(conn, "first"), await index_lists(conn, "second")) == (6, None)

            await bulk_create(conn, [("second", f"n{i}", 0.5, None, random_vector(rng)) for i in range(16)])
            assert await job() == []  # 36 memories: larger than first's 30, not 25% larger
            assert (await index_lists(conn, "first"), await index_lists(conn, "second")) == (6, None)

            await bulk_create(conn, [("second", f"o{i}", 0.5, None, random_vector(rng)) for i in range(4)])
            assert await job() == ["second"]  # 40 > 1.25 x 30
            assert await conn.fetchval("SELECT to_regclass(memory_vector_index_name('first'))") is None
            assert await index_lists(conn, "second") == 7  # ceil(sqrt(40))
            assert await job() == []  # nothing due

            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = memory_pb2_grpc.MemoryServiceStub(channel)
                async with exact_connection(db_url) as exact:
                    for _ in range(3):
                        query = random_vector(rng)
                        truth = [i for i, _ in await exact_nearest(exact, "first", query)]
                        assert [r.memory.memory_id for r in await search(stub, "first", query, metadata=SERVICE)] == truth

            # Another table's index of the same shape stays. A rebuild whose REINDEX
            # CONCURRENTLY failed (new lists set, a _ccnew left, the index built with
            # the old lists) is done again: the leftover goes, the index is rebuilt.
            await conn.execute("CREATE TABLE not_memories (user_id text)")
            foreign = await conn.fetchval("SELECT memory_vector_index_name('someone')")
            name = await conn.fetchval("SELECT memory_vector_index_name('second')")
            await conn.execute(f'CREATE INDEX "{foreign}" ON not_memories (user_id)')
            await conn.execute(f'CREATE INDEX "{name}_ccnew" ON memories (user_id) WHERE user_id = \'second\'')
            built_file = await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", name)
            assert await job() == ["second"]
            assert await conn.fetchval("SELECT to_regclass($1)", foreign) is not None
            assert await conn.fetchval("SELECT to_regclass($1)", f"{name}_ccnew") is None
            assert await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", name) != built_file
            assert await index_lists(conn, "second") == 7
            assert await job() == []  # and done

            # Nobody above 80% of a higher threshold (40 of 50): every user index is dropped.
            async with maintenance_runner(db_url, search_exact_max_memories=50) as higher:
                assert await higher.maintain_vector_indexes() == []
            assert await index_lists(conn, "second") is None
        finally:
            await server.stop(grace=0)
    finally:
        await conn.close()


async def test_an_index_stays_while_its_user_hovers_around_the_threshold(db_url: str) -> None:
    """A user whose count goes back and forth across search_exact_max_memories
    keeps their index (no drop and build per maintenance run, each build a scan of
    memories) and is searched exactly while at or below it; the index goes once
    they fall to 80% of the threshold, or when the cap's last place is wanted by
    a user above the threshold."""
    rng = random.Random(38)
    conn = await database.connect(db_url)
    try:
        ids = await bulk_create(conn, [("hover", f"m{i}", 0.5, None, random_vector(rng)) for i in range(11)])
        async with maintenance_runner(db_url, search_exact_max_memories=10) as runner:
            assert await runner.maintain_vector_indexes() == ["hover"]
            for memory_id in ids[:3]:  # 10, 9, 8 memories
                await conn.execute("SELECT delete_memory('hover', $1::uuid)", memory_id)
                count = await conn.fetchval("SELECT memory_count FROM memory_users WHERE user_id = 'hover'")
                assert await runner.maintain_vector_indexes() == []
                kept = await index_lists(conn, "hover") is not None
                assert kept == (count > 8), count
                assert await conn.fetchval("SELECT memory_vector_index_usable('hover', 10)") is False
            await bulk_create(conn, [("hover", f"n{i}", 0.5, None, random_vector(rng)) for i in range(3)])  # 11
            assert await runner.maintain_vector_indexes() == ["hover"]
            assert await conn.fetchval("SELECT memory_vector_index_usable('hover', 10)") is True
        await conn.execute("SELECT delete_memory('hover', $1::uuid)", ids[3])  # 10: kept, unused
        await bulk_create(conn, [("above", f"m{i}", 0.5, None, random_vector(rng)) for i in range(11)])
        async with maintenance_runner(db_url, search_exact_max_memories=10, vector_index_max_users=1) as capped:
            assert await capped.maintain_vector_indexes() == ["above"]  # 11 beats hover's 10 x 1.25: hover is below
            assert await index_lists(conn, "hover") is None
    finally:
        await conn.close()


async def test_maintenance_warns_once_per_change_in_the_users_left_unindexed(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """vector_indexes_capped is logged when the number of users above the threshold
    (more than the cap) changes, not at every run (once a minute)."""
    caplog.set_level(logging.WARNING, logger="nexus.maintenance")
    rng = random.Random(40)
    conn = await database.connect(db_url)
    try:
        for user in ("one", "two"):
            await bulk_create(conn, [(user, f"m{i}", 0.5, None, random_vector(rng)) for i in range(11)])
        async with maintenance_runner(db_url, search_exact_max_memories=10, vector_index_max_users=1) as runner:
            for _ in range(3):
                await runner.maintain_vector_indexes()
            await bulk_create(conn, [("three", f"m{i}", 0.5, None, random_vector(rng)) for i in range(11)])
            for _ in range(2):
                await runner.maintain_vector_indexes()
    finally:
        await conn.close()
    capped = [r.getMessage() for r in caplog.records if "event=vector_indexes_capped" in r.getMessage()]
    assert capped == [
        "event=vector_indexes_capped users_above_exact_max=2 vector_index_max_users=1",
        "event=vector_indexes_capped users_above_exact_max=3 vector_index_max_users=1",
    ]
