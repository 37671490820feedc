"""MemoryService.SearchMemories by text and hybrid, and the server-side embedder.

Text (query only): BM25 over the user's memories, checked against the formula
computed here (k1 1.2, b 0.75, Lucene IDF, N / average length / document
frequencies of that user only), and its properties: a rarer term ranks
higher, term frequency saturates, longer memories rank lower, another user's
memories change nothing, statistics follow updates and deletes. Hybrid (query
and embedding): the min-max fusion recomputed here from the text-only and
vector-only answers. Filters before the limit in every mode, best first,
isolation, odd query text. Embedder on (wordllama, 256 dimensions, offline):
memories created without an embedding get one, a query alone runs hybrid, a
new content is embedded again, client embeddings are kept; a dimension
mismatch is a startup error.

The words used (zebra, mango, kiwi ...) are their own English lexemes, so the
expected scores can be computed from the texts.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest

from nexus import config as nexus_config
from nexus import embedder
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

from support.databases import scratch_database
from support.rpc import Clients, auth, rpc_error
from support.servers import serving
from support.vectors import create, distance, f32, random_vector

# On the cluster, every call of this file runs inside one user's worker as it
# does on one node: the cluster pass of CI keeps the tests of racing writes
# (marked cluster), the release check runs them all.

K1, B = 1.2, 0.75
COSINE = pb.DISTANCE_METRIC_COSINE
FILLER = ["walrus", "falcon", "cobalt", "tulip", "basalt", "orchid", "granite", "violet", "copper", "meadow"]


async def text_search(stub: Any, user: str, query: str, **fields: Any) -> list[pb.SearchResult]:
    request = pb.SearchMemoriesRequest(user_id=user, query=query, **fields)
    return list((await stub.SearchMemories(request, metadata=auth(user))).results)


async def hybrid_search(stub: Any, user: str, query: str, embedding: Sequence[float], **fields: Any) -> list[pb.SearchResult]:
    request = pb.SearchMemoriesRequest(user_id=user, query=query, embedding=embedding, **fields)
    return list((await stub.SearchMemories(request, metadata=auth(user))).results)


def bm25(query: str, corpus: dict[str, str]) -> dict[str, float]:
    """The expected text_score of each matching memory (id -> content, words
    that are their own lexemes, no stop words)."""
    documents = {i: Counter(text.split()) for i, text in corpus.items()}
    n = len(documents)
    avgdl = sum(sum(d.values()) for d in documents.values()) / n
    scores: dict[str, float] = {}
    for term in set(query.split()):
        df = sum(1 for d in documents.values() if term in d)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in documents.items():
            if term in d:
                dl = sum(d.values())
                scores[i] = scores.get(i, 0) + idf * d[term] * (K1 + 1) / (d[term] + K1 * (1 - B + B * dl / avgdl))
    return scores


def ids(results: list[pb.SearchResult]) -> list[str]:
    return [r.memory.memory_id for r in results]


def assert_best_first(results: list[pb.SearchResult]) -> None:
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True), scores


async def make(stub: Any, user: str, texts: Sequence[str], **fields: Any) -> dict[str, str]:
    created = [await create(stub, user, text, **fields) for text in texts]
    return {m.memory_id: m.content for m in created}


# --- BM25 ---------------------------------------------------------------------


async def test_text_scores_are_bm25_over_the_users_memories(clients: Clients) -> None:
    stub = clients.memories
    corpus = await make(stub, "alice", [
        "zebra mango", "zebra zebra kiwi walrus falcon", "mango mango mango kiwi", "quartz lemon walrus",
        "zebra", "kiwi kiwi cobalt tulip basalt orchid granite violet",
    ])  # fmt: skip
    for query in ("zebra", "mango kiwi", "zebra quartz kiwi", "lemon"):
        got = await text_search(stub, "alice", query, top_k=100)
        expected = bm25(query, corpus)
        assert {r.memory.memory_id: r.text_score for r in got} == pytest.approx(expected, rel=1e-9), query
        assert ids(got) == sorted(expected, key=lambda i: (-expected[i], i))
        for r in got:
            assert r.score == r.text_score and r.HasField("text_score") and not r.HasField("distance")


async def test_a_rarer_term_ranks_higher(clients: Clients) -> None:
    stub = clients.memories
    corpus = await make(stub, "alice", ["zebra walrus", "mango walrus", "mango falcon", "mango cobalt", "mango tulip"])
    got = await text_search(stub, "alice", "zebra mango")
    by_content = {corpus[r.memory.memory_id]: r.text_score for r in got}
    # Same length, one term each: the term in one memory beats the term in four.
    assert ids(got)[0] == next(i for i, c in corpus.items() if c == "zebra walrus")
    assert by_content["zebra walrus"] > by_content["mango walrus"] > 0


async def test_term_frequency_saturates(clients: Clients) -> None:
    stub = clients.memories
    # All eight words long, so only the number of zebras differs.
    texts = [" ".join(["zebra"] * tf + FILLER[: 8 - tf]) for tf in (1, 2, 4, 8)]
    corpus = await make(stub, "alice", [*texts, "kiwi " * 8])
    scores = {corpus[r.memory.memory_id].count("zebra"): r.text_score for r in await text_search(stub, "alice", "zebra")}
    assert scores[1] < scores[2] < scores[4] < scores[8]
    assert scores[2] - scores[1] > scores[4] - scores[2] > scores[8] - scores[4]  # each doubling adds less
    idf = math.log(1 + (5 - 4 + 0.5) / (4 + 0.5))
    assert scores[8] < idf * (K1 + 1)  # the bound a term's score approaches


async def test_longer_memories_rank_lower_for_the_same_term_frequency(clients: Clients) -> None:
    stub = clients.memories
    corpus = await make(stub, "alice", ["zebra", "zebra walrus falcon", " ".join(["zebra", *FILLER])])
    got = await text_search(stub, "alice", "zebra")
    assert [len(corpus[i].split()) for i in ids(got)] == [1, 3, 11]


async def test_another_users_memories_change_nothing(clients: Clients) -> None:
    stub = clients.memories
    await make(stub, "alice", ["zebra mango", "mango kiwi walrus", "kiwi", "zebra zebra falcon"])
    before = await text_search(stub, "alice", "zebra mango kiwi")
    # Bob makes zebra common and floods every term: Alice's IDF is her own.
    await make(stub, "bob", ["zebra"] * 30 + ["mango kiwi"] * 5)
    after = await text_search(stub, "alice", "zebra mango kiwi")
    assert [(r.memory.memory_id, r.text_score) for r in after] == [(r.memory.memory_id, r.text_score) for r in before]
    assert {r.memory.user_id for r in after} == {"alice"}
    assert {r.memory.user_id for r in await text_search(stub, "bob", "zebra", top_k=100)} == {"bob"}


async def test_statistics_follow_updates_and_deletes(clients: Clients, db: asyncpg.Connection) -> None:
    stub = clients.memories
    corpus = await make(stub, "alice", ["zebra mango", "mango kiwi walrus", "kiwi", "zebra falcon cobalt tulip"])
    first, second = list(corpus)[:2]
    await stub.UpdateMemory(
        pb.UpdateMemoryRequest(memory=pb.Memory(memory_id=first, user_id="alice", content="zebra zebra zebra quartz"),
                               update_mask={"paths": ["content"]}),
        metadata=auth("alice"),
    )  # fmt: skip
    corpus[first] = "zebra zebra zebra quartz"
    await stub.DeleteMemory(pb.DeleteMemoryRequest(user_id="alice", memory_id=second), metadata=auth("alice"))
    del corpus[second]
    # Entities are searchable text too.
    tagged = await create(stub, "alice", "lemon", entities=["Zebra"])
    corpus[tagged.memory_id] = "lemon zebra"

    got = await text_search(stub, "alice", "zebra kiwi", top_k=100)
    assert {r.memory.memory_id: r.text_score for r in got} == pytest.approx(bm25("zebra kiwi", corpus), rel=1e-9)
    row = await db.fetchrow(
        """SELECT u.memory_count, u.search_length_total,
                  (SELECT sum(search_length) FROM memories m WHERE m.user_id = u.user_id) AS total
           FROM memory_users u WHERE u.user_id = 'alice'"""
    )
    assert (row["memory_count"], row["search_length_total"], row["total"]) == (4, 11, 11)


@pytest.mark.cluster
async def test_concurrent_writes_keep_the_length_statistics_exact(clients: Clients, db: asyncpg.Connection) -> None:
    stub = clients.memories
    rng = random.Random(5)
    texts = [" ".join(rng.choices(FILLER, k=rng.randint(1, 9))) for _ in range(60)]
    created = await asyncio.gather(*(create(stub, "alice", t) for t in texts))
    await asyncio.gather(*(
        stub.DeleteMemory(pb.DeleteMemoryRequest(user_id="alice", memory_id=m.memory_id), metadata=auth("alice"))
        for m in created[::3]
    ), *(create(stub, "alice", "zebra " * (i + 1)) for i in range(20)))  # fmt: skip
    row = await db.fetchrow(
        """SELECT u.memory_count, u.search_length_total,
                  (SELECT count(*) FROM memories m WHERE m.user_id = u.user_id) AS n,
                  (SELECT sum(search_length) FROM memories m WHERE m.user_id = u.user_id) AS total
           FROM memory_users u WHERE u.user_id = 'alice'"""
    )
    assert row["memory_count"] == row["n"] == 60
    assert row["search_length_total"] == row["total"]


async def test_a_query_of_stop_words_only_or_unknown_terms_finds_nothing(clients: Clients) -> None:
    await make(clients.memories, "alice", ["zebra mango", "the and of"])
    assert await text_search(clients.memories, "alice", "the and of it") == []
    assert await text_search(clients.memories, "alice", "quartz") == []


@pytest.mark.parametrize(
    "query",
    ["it's O'Brien", "back\\slash \\\\ '\\''", "zebra & | ! ( ) :* <-> <2>", "'zebra'", "zebra:A", "ünïcödé 漢字 🦓",
     "a" * 1000, "-- DROP TABLE memories; ' OR 1=1", "%s %L $1"],
)  # fmt: skip
async def test_any_query_text_is_just_text(clients: Clients, query: str) -> None:
    await make(clients.memories, "alice", ["zebra mango", "o'brien's backslash"])
    results = await text_search(clients.memories, "alice", query)
    assert {r.memory.user_id for r in results} <= {"alice"}
    assert_best_first(results)


# --- hybrid -------------------------------------------------------------------


def normalised(values: dict[str, float]) -> dict[str, float]:
    low, high = min(values.values()), max(values.values())
    return {k: (v - low) / (high - low) if high > low else 0.0 for k, v in values.items()}


async def test_hybrid_mixes_normalised_vector_and_text_scores(clients: Clients) -> None:
    stub = clients.memories
    rng = random.Random(21)
    query_vector = random_vector(rng)
    texts = ["zebra mango", "zebra", "mango kiwi walrus", "kiwi", "falcon cobalt", "tulip", "zebra zebra basalt"]
    vectors = [random_vector(rng, center=query_vector, spread=s) for s in (3.0, 0.4, 1.0, 0.2, 2.0, 0.6, 5.0)]
    created = [await create(stub, "alice", t, v) for t, v in zip(texts, vectors, strict=True)]
    plain = await create(stub, "alice", "zebra kiwi without embedding")
    await make(stub, "bob", ["zebra kiwi"] * 3)

    text = {r.memory.memory_id: r.text_score for r in await text_search(stub, "alice", "zebra kiwi", top_k=100)}
    similarity = {m.memory_id: 1 - distance(query_vector, v, COSINE) for m, v in zip(created, vectors, strict=True)}
    candidates = set(similarity) | set(text)
    vector_part = normalised(similarity)
    text_part = normalised({i: text.get(i, 0.0) for i in candidates})
    expected = {i: 0.3 * vector_part.get(i, 0.0) + 0.7 * text_part[i] for i in candidates}

    got = await hybrid_search(stub, "alice", "zebra kiwi", query_vector, top_k=100)
    assert {r.memory.memory_id: r.score for r in got} == pytest.approx(expected, abs=1e-6)
    assert_best_first(got)
    assert {r.memory.user_id for r in got} == {"alice"}
    for r in got:
        assert r.HasField("distance") == (r.memory.memory_id != plain.memory_id)
        assert r.HasField("text_score") == (r.memory.memory_id in text)
    # The winner is neither the nearest nor the best by text alone.
    nearest = max(similarity, key=similarity.__getitem__)
    best_text = max(text, key=text.__getitem__)
    assert ids(got)[0] not in (nearest, best_text) or nearest == best_text
    top3 = await hybrid_search(stub, "alice", "zebra kiwi", query_vector, top_k=3)
    assert ids(top3) == ids(got)[:3]


async def test_vector_only_scores_are_similarities(clients: Clients) -> None:
    stub = clients.memories
    rng = random.Random(22)
    for i in range(5):
        await create(stub, "alice", f"zebra {i}", random_vector(rng))
    query = random_vector(rng)
    request = pb.SearchMemoriesRequest(user_id="alice", embedding=query)
    for metric, score in ((COSINE, lambda d: 1 - d), (pb.DISTANCE_METRIC_L2, lambda d: -d)):
        request.metric = metric
        results = (await stub.SearchMemories(request, metadata=auth("alice"))).results
        assert [r.score for r in results] == pytest.approx([score(r.distance) for r in results])
        assert all(not r.HasField("text_score") for r in results)
        assert_best_first(list(results))


@pytest.mark.parametrize("mode", ["text", "hybrid"])
async def test_filters_apply_before_the_limit(clients: Clients, mode: str) -> None:
    """40 memories match the text; 4 match each filter, and they rank low."""
    stub = clients.memories
    rng = random.Random(23)
    query_vector = random_vector(rng)

    def far() -> list[float]:
        return random_vector(rng, center=[-x for x in query_vector], spread=0.3)

    for i in range(40):
        vector = random_vector(rng, center=query_vector, spread=0.3)
        await create(stub, "alice", "zebra zebra " + " ".join(FILLER[: i % 3]), vector)
    rare = [await create(stub, "alice", "zebra " + " ".join(FILLER), far(), emotion_type="rare") for _ in range(4)]
    strong = [await create(stub, "alice", "zebra " + " ".join(FILLER), far(), gravity_score=0.97) for _ in range(4)]
    # Memories created from `since` on (the first of them at it): 4.
    recent = [await create(stub, "alice", "zebra " + " ".join(FILLER), far()) for _ in range(4)]
    since = recent[0].create_time

    async def run(**fields: Any) -> list[pb.SearchResult]:
        if mode == "text":
            return await text_search(stub, "alice", "zebra", top_k=3, **fields)
        return await hybrid_search(stub, "alice", "zebra", query_vector, top_k=3, **fields)

    for fields, matching in ((dict(emotion_type="rare"), rare), (dict(min_gravity=0.95), strong), (dict(since=since), recent)):
        got = await run(**fields)
        assert len(got) == 3, fields
        assert set(ids(got)) <= {m.memory_id for m in matching}, fields
        assert_best_first(got)
    assert len(await run(emotion_type="rare", min_gravity=0.95)) == 0


async def test_a_blank_query_with_an_embedding_is_a_vector_search(clients: Clients) -> None:
    stub = clients.memories
    vector = random_vector(random.Random(24))
    memory = await create(stub, "alice", "zebra", vector)
    got = await hybrid_search(stub, "alice", "   ", vector)
    assert ids(got) == [memory.memory_id]
    assert got[0].HasField("distance") and not got[0].HasField("text_score")


# --- pruning: the page read from the fewest memories equals the full ranking ----------

RARE = ["zebra", "mango", "kiwi", "quartz", "lemon"]
# Many memories match the common words (so the rarest terms are read first and
# the common ones only scored), few the rare ones.
ZIPF_WORDS = FILLER + RARE
ZIPF_WEIGHTS = [1 / (rank + 1) for rank in range(len(ZIPF_WORDS))]


async def seeded_corpus(
    stub: Any, rng: random.Random, user: str, n: int
) -> tuple[dict[str, str], dict[str, list[float]], dict[str, float]]:
    """n memories (texts, embeddings around 4 centres, gravities); every 10th without an embedding."""
    centres = [random_vector(rng) for _ in range(4)]
    specs = []
    for i in range(n):
        text = " ".join(rng.choices(ZIPF_WORDS, ZIPF_WEIGHTS, k=rng.randint(1, 8)))
        vector = random_vector(rng, center=centres[i % 4], spread=0.6) if i % 10 else []
        specs.append((text, vector, round(rng.random() * 0.79, 3)))
    created = await asyncio.gather(*(create(stub, user, t, v, gravity_score=g) for t, v, g in specs))
    texts = {m.memory_id: m.content for m in created}
    vectors = {m.memory_id: v for m, (_, v, _) in zip(created, specs, strict=True) if v}
    gravities = {m.memory_id: g for m, (_, _, g) in zip(created, specs, strict=True)}
    return texts, vectors, gravities


def ranked(scores: dict[str, float], top_k: int) -> list[str]:
    return sorted(scores, key=lambda i: (-scores[i], i))[:top_k]


async def test_text_top_k_is_the_head_of_the_full_bm25_ranking(clients: Clients) -> None:
    """Queries mixing common and rare words, pages small enough for MaxScore
    to stop after the rare terms and large enough to need every term."""
    stub = clients.memories
    rng = random.Random(31)
    texts, _, gravities = await seeded_corpus(stub, rng, "alice", 240)
    queries = ["walrus zebra", "walrus falcon", "walrus falcon cobalt lemon", "kiwi", "tulip quartz mango", "falcon walrus"]
    for query in queries:
        full = bm25(query, texts)
        for top_k, min_gravity in ((1, 0.0), (3, 0.0), (10, 0.0), (40, 0.0), (5, 0.5)):
            wanted = {i: s for i, s in full.items() if gravities[i] >= min_gravity}
            got = await text_search(stub, "alice", query, top_k=top_k, min_gravity=min_gravity)
            assert ids(got) == ranked(wanted, top_k), (query, top_k, min_gravity)
            assert [r.text_score for r in got] == pytest.approx([wanted[i] for i in ids(got)], rel=1e-9)


async def test_filtered_text_top_k_is_the_head_of_the_filtered_bm25_ranking(clients: Clients) -> None:
    """Text scores come from the postings, the filters from the memories: each
    filter (and all three) applies before the limit, over the memories that
    hold the rarest words and those that hold only common ones, with BM25's
    statistics still over every memory of the user."""
    stub = clients.memories
    rng = random.Random(34)
    specs = [
        (" ".join(rng.choices(ZIPF_WORDS, ZIPF_WEIGHTS, k=rng.randint(1, 8))), round(rng.random(), 3),
         rng.choice(["calm", "awe", ""]))
        for _ in range(200)
    ]  # fmt: skip
    # In two rounds, so that `since` (the earliest of the second) parts them.
    created = [
        *await asyncio.gather(*(create(stub, "alice", t, gravity_score=g, emotion_type=e) for t, g, e in specs[:100])),
        *await asyncio.gather(*(create(stub, "alice", t, gravity_score=g, emotion_type=e) for t, g, e in specs[100:])),
    ]
    texts = {m.memory_id: m.content for m in created}
    since = min((m.create_time for m in created[100:]), key=lambda t: t.ToDatetime())
    filters: list[tuple[dict[str, Any], Any]] = [
        (dict(min_gravity=0.6), lambda m: m.gravity_score >= 0.6),
        (dict(emotion_type="awe"), lambda m: m.emotion_type == "awe"),
        (dict(since=since), lambda m: m.create_time.ToDatetime() >= since.ToDatetime()),
        (dict(min_gravity=0.3, emotion_type="calm", since=since),
         lambda m: m.gravity_score >= 0.3 and m.emotion_type == "calm" and m.create_time.ToDatetime() >= since.ToDatetime()),
    ]  # fmt: skip
    for query in ("walrus zebra", "walrus falcon cobalt lemon", "tulip quartz mango", "falcon"):
        full = bm25(query, texts)
        for fields, passes in filters:
            wanted = {m.memory_id: full[m.memory_id] for m in created if m.memory_id in full and passes(m)}
            assert 1 < len(wanted) < len(full), (query, fields)  # the filter removes some matches, not all
            for top_k in (1, 5, 25):
                got = await text_search(stub, "alice", query, top_k=top_k, **fields)
                assert ids(got) == ranked(wanted, top_k), (query, fields, top_k)
                assert [r.text_score for r in got] == pytest.approx([wanted[i] for i in ids(got)], rel=1e-9)


async def test_hybrid_page_equals_fusing_every_memory(clients: Clients) -> None:
    """The exact path prunes both sides (the pool best by text, then only the
    nearest memories whose bound reaches the page): the page must equal the
    min-max fusion of every matching memory, computed here."""
    stub = clients.memories
    rng = random.Random(32)
    texts, vectors, gravities = await seeded_corpus(stub, rng, "alice", 240)
    for query, top_k, min_gravity in (
        ("walrus zebra", 10, 0.0), ("walrus falcon", 3, 0.0), ("kiwi lemon", 10, 0.0), ("walrus", 1, 0.0),
        ("falcon cobalt tulip", 25, 0.0), ("walrus zebra", 5, 0.6), ("quartz", 10, 0.0),
    ):  # fmt: skip
        probe = random_vector(rng, center=rng.choice(list(vectors.values())), spread=0.3)
        similarity = {i: 1 - distance(probe, v, COSINE) for i, v in vectors.items() if gravities[i] >= min_gravity}
        text = {i: s for i, s in bm25(query, texts).items() if gravities[i] >= min_gravity}
        nearest, farthest, best_text = max(similarity.values()), min(similarity.values()), max(text.values())
        expected = {
            i: 0.3 * ((similarity[i] - farthest) / (nearest - farthest) if i in similarity else 0.0)
            + 0.7 * text.get(i, 0.0) / best_text
            for i in set(similarity) | set(text)
        }
        got = await hybrid_search(stub, "alice", query, probe, top_k=top_k, min_gravity=min_gravity)
        assert ids(got) == ranked(expected, top_k), (query, top_k, min_gravity)
        # pgvector sums distances in float32.
        assert [r.score for r in got] == pytest.approx([expected[i] for i in ids(got)], abs=1e-6)
        assert [r.text_score if r.HasField("text_score") else None for r in got] == pytest.approx(
            [text.get(i) for i in ids(got)], rel=1e-9
        )


async def recounted_postings(db: asyncpg.Connection) -> list[tuple[str, str, Any, int, int]]:
    """The memory_terms rows recounted from the memories' contents (words of
    ZIPF_WORDS, no stop words): (user, lexeme, memory, the word's count, the
    content's word count); a word's lexeme is its English stem."""
    stems = dict(
        await db.fetch("SELECT w, (tsvector_to_array(to_tsvector('english', w)))[1] FROM unnest($1::text[]) w", ZIPF_WORDS)
    )
    return sorted(
        (m["user_id"], stems[word], m["memory_id"], count, len(m["content"].split()))
        for m in await db.fetch("SELECT user_id, memory_id, content FROM memories")
        for word, count in Counter(m["content"].split()).items()
    )


async def kept_postings(db: asyncpg.Connection) -> list[tuple[str, str, Any, int, int]]:
    rows = await db.fetch("SELECT user_id, lexeme, memory_id, term_frequency, search_length FROM memory_terms")
    return sorted(tuple(r) for r in rows)


def update_content(
    stub: memory_pb2_grpc.MemoryServiceStub, user: str, memory_id: str, content: str
) -> Awaitable[pb.UpdateMemoryResponse]:
    """UpdateMemory of the memory's content alone, as its user."""
    return stub.UpdateMemory(
        pb.UpdateMemoryRequest(memory=pb.Memory(memory_id=memory_id, user_id=user, content=content),
                               update_mask={"paths": ["content"]}),
        metadata=auth(user),
    )  # fmt: skip


@pytest.mark.cluster
async def test_term_statistics_stay_exact_under_concurrent_writes(clients: Clients, db: asyncpg.Connection) -> None:
    """memory_terms (each lexeme of each memory with its count and the memory's
    length) against a recount from the contents, after concurrent creates,
    deletes and content updates of one user (new words at the same length;
    one word more, every other kept; the same length with other counts) and a
    direct multi-row INSERT / DELETE."""
    stub = clients.memories
    rng = random.Random(33)
    texts = [" ".join(rng.choices(ZIPF_WORDS, k=rng.randint(2, 6))) for _ in range(60)]
    created = await asyncio.gather(*(create(stub, "alice", t) for t in texts), *(create(stub, "bob", t) for t in texts[:20]))

    alice = created[:60]
    await asyncio.gather(
        *(stub.DeleteMemory(pb.DeleteMemoryRequest(user_id="alice", memory_id=m.memory_id), metadata=auth("alice"))
          for m in alice[::4]),
        *(update_content(stub, "alice", m.memory_id, " ".join(rng.sample(ZIPF_WORDS, len(m.content.split()))))
          for m in alice[1::4]),
        *(update_content(stub, "alice", m.memory_id, "quartz " + m.content) for m in alice[2::4]),
        *(update_content(stub, "alice", m.memory_id, " ".join([m.content.split()[0]] * len(m.content.split())))
          for m in alice[3::4]),
        *(create(stub, "alice", " ".join(rng.choices(ZIPF_WORDS, k=4))) for _ in range(20)),
    )  # fmt: skip
    await db.execute(
        """INSERT INTO memories (user_id, content, gravity_score, temporal_type)
           SELECT 'carol', 'zebra walrus ' || repeat('kiwi ', n), 0.5, 'present' FROM generate_series(1, 5) n"""
    )
    await db.execute("DELETE FROM memories WHERE user_id = 'carol' AND content LIKE '%kiwi kiwi kiwi%'")
    kept = await kept_postings(db)
    assert kept == await recounted_postings(db)
    assert {r[0] for r in kept} == {"alice", "bob", "carol"}
    assert sorted(r[3:] for r in kept if r[0] == "carol" and r[1] == "kiwi") == [(1, 3), (2, 4)]
    # No word of a deleted memory stays behind.
    await db.execute("DELETE FROM memories WHERE user_id = 'carol'")
    assert await db.fetchval("SELECT count(*) FROM memory_terms WHERE user_id = 'carol'") == 0


@pytest.mark.cluster
async def test_term_statistics_stay_exact_when_writes_race_on_one_memory(
    clients: Clients, db: asyncpg.Connection
) -> None:
    """Ten content updates of one memory at once, and updates racing a delete of
    another: memory_terms equals a recount of whatever won, and the deleted
    memory leaves no row (an update that comes after the delete is NOT_FOUND).
    Through the service these writes queue on the user's lock (UpdateMemory and
    DeleteMemory take it first); the next test races the trigger itself."""
    stub = clients.memories
    rng = random.Random(35)
    contested, doomed = await asyncio.gather(*(create(stub, "alice", " ".join(rng.choices(ZIPF_WORDS, k=3)))
                                               for _ in range(2)))  # fmt: skip

    async def update(memory_id: str, content: str) -> None:
        try:
            await update_content(stub, "alice", memory_id, content)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND and memory_id == doomed.memory_id

    contents = [" ".join(rng.choices(ZIPF_WORDS, k=rng.randint(1, 7))) for _ in range(10)]
    await asyncio.gather(
        *(update(contested.memory_id, c) for c in contents),
        *(update(doomed.memory_id, c) for c in contents[:5]),
        stub.DeleteMemory(pb.DeleteMemoryRequest(user_id="alice", memory_id=doomed.memory_id), metadata=auth("alice")),
    )
    assert await db.fetchval("SELECT content FROM memories WHERE memory_id = $1", uuid.UUID(contested.memory_id)) in contents
    assert await kept_postings(db) == await recounted_postings(db)
    assert await db.fetchval("SELECT count(*) FROM memory_terms WHERE memory_id = $1", uuid.UUID(doomed.memory_id)) == 0


async def test_term_statistics_stay_exact_when_direct_updates_race_on_one_memory(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    """The posting trigger under contention, with no service lock in front: per
    round, ten connections UPDATE one memory's content at once (each waits on the
    row, then its trigger runs on what the winner wrote) while five update another
    that a sixth deletes. memory_terms equals a recount after every round."""
    rng = random.Random(36)
    pool = await asyncpg.create_pool(db_url, min_size=16, max_size=16)
    assert pool is not None
    try:
        for _ in range(5):
            contested, doomed = [
                uuid.UUID((await create(clients.memories, "alice", " ".join(rng.choices(ZIPF_WORDS, k=3)))).memory_id)
                for _ in range(2)
            ]
            contents = [" ".join(rng.choices(ZIPF_WORDS, k=rng.randint(1, 7))) for _ in range(10)]
            update = "UPDATE memories SET content = $2 WHERE user_id = 'alice' AND memory_id = $1"
            await asyncio.gather(
                *(pool.execute(update, contested, c) for c in contents),
                *(pool.execute(update, doomed, c) for c in contents[:5]),
                pool.execute("DELETE FROM memories WHERE user_id = 'alice' AND memory_id = $1", doomed),
            )
            assert await kept_postings(db) == await recounted_postings(db)
            assert await db.fetchval(
                """SELECT u.search_length_total = (SELECT sum(m.search_length) FROM memories m WHERE m.user_id = u.user_id)
                   FROM memory_users u WHERE u.user_id = 'alice'"""
            )
            assert await db.fetchval("SELECT count(*) FROM memory_terms WHERE memory_id = $1", doomed) == 0
            assert await db.fetchval("SELECT content FROM memories WHERE memory_id = $1", contested) in contents
    finally:
        await pool.close()


# --- recency and gravity -------------------------------------------------------------


async def test_recency_and_gravity_weights_rerank_and_are_off_by_default(clients: Clients, db: asyncpg.Connection) -> None:
    stub = clients.memories
    # (content, gravity, age in hours): the short one is the best by BM25.
    specs = [("zebra", 0.1, 900), ("zebra walrus falcon", 0.9, 300), ("zebra walrus cobalt", 0.5, 0)]
    created = [await create(stub, "alice", text, gravity_score=gravity) for text, gravity, _ in specs]
    for memory, (_, _, hours) in zip(created, specs, strict=True):
        await db.execute(
            "UPDATE memories SET create_time = now() - make_interval(hours => $2) WHERE memory_id = $1::uuid",
            memory.memory_id, hours,
        )  # fmt: skip
    plain = await text_search(stub, "alice", "zebra")
    assert ids(plain)[0] == created[0].memory_id
    assert [r.score for r in plain] == [r.text_score for r in plain]  # off by default

    relevance = normalised({r.memory.memory_id: r.text_score for r in plain})
    for weights in (dict(gravity_weight=0.8), dict(recency_weight=0.8), dict(recency_weight=0.3, gravity_weight=0.3)):
        got = await text_search(stub, "alice", "zebra", **weights)
        wr, wg = weights.get("recency_weight", 0.0), weights.get("gravity_weight", 0.0)
        expected = {
            m.memory_id: (1 - wr - wg) * relevance[m.memory_id] + wr * 0.995**hours + wg * gravity
            for m, (_, gravity, hours) in zip(created, specs, strict=True)
        }
        assert {r.memory.memory_id: r.score for r in got} == pytest.approx(expected, abs=1e-3), weights
        assert_best_first(got)
    assert ids(await text_search(stub, "alice", "zebra", gravity_weight=0.8))[0] == created[1].memory_id
    assert ids(await text_search(stub, "alice", "zebra", recency_weight=0.8))[0] == created[2].memory_id
    assert len(await text_search(stub, "alice", "zebra", top_k=2, gravity_weight=0.8)) == 2


# --- the embedder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordllama() -> embedder.Embedder:
    loaded = embedder.from_config("wordllama")
    assert loaded is not None
    return loaded


@pytest.fixture
async def dim256_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A database migrated for 256-dimensional embeddings."""
    async with scratch_database(pg_admin_url, "nexus_dim256", embedding_dim=256) as url:
        yield url


def test_the_model_loads_with_no_network_and_embeds_meaningfully(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object) -> None:
        raise AssertionError(f"the embedder tried to connect to {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    wordllama = embedder.from_config("wordllama")
    assert wordllama is not None
    cat, kitten, invoice = wordllama.embed_batch(
        ["my cat sleeps on the sofa", "the kitten naps on the couch", "quarterly tax invoice"]
    )
    assert cat is not None and kitten is not None and invoice is not None
    assert len(cat) == 256 and sum(x * x for x in cat) == pytest.approx(1, rel=1e-4)
    assert distance(cat, kitten, COSINE) < distance(cat, invoice, COSINE)
    assert wordllama.embed_batch([""]) == [None]


async def test_embedder_embeds_memories_and_queries(dim256_url: str, wordllama: embedder.Embedder) -> None:
    async with serving(dim256_url, embedder="wordllama", embedding_dim=256) as stub:
        texts = ["my cat sleeps on the sofa all afternoon", "we filed the quarterly tax invoice",
                 "the kitten chased a red ball", "planning a hiking trip to the alps"]  # fmt: skip
        created = [await create(stub, "alice", t) for t in texts]
        stored = await stub.GetMemory(
            pb.GetMemoryRequest(user_id="alice", memory_id=created[0].memory_id, include_embedding=True), metadata=auth("alice")
        )
        assert list(stored.memory.embedding) == pytest.approx(f32(wordllama.embed_batch([texts[0]])[0]), abs=1e-6)

        # A client-side embedding of a paraphrase finds it by vector alone.
        probe = wordllama.embed_batch(["a sleepy cat on the couch"])[0]
        as_alice = auth("alice")
        paraphrase = pb.SearchMemoriesRequest(user_id="alice", embedding=probe, top_k=2)
        nearest = await stub.SearchMemories(paraphrase, metadata=as_alice)
        assert nearest.results[0].memory.memory_id == created[0].memory_id

        # A query alone runs both sides: a word no memory holds still finds by meaning.
        kitty = pb.SearchMemoriesRequest(user_id="alice", query="kitty", top_k=4)
        got = (await stub.SearchMemories(kitty, metadata=as_alice)).results
        assert all(r.HasField("distance") for r in got)
        hybrid = (
            await stub.SearchMemories(pb.SearchMemoriesRequest(user_id="alice", query="tax invoice"), metadata=as_alice)
        ).results
        assert hybrid[0].memory.memory_id == created[1].memory_id and hybrid[0].HasField("text_score")

        # New content: embedded again. A client's own embedding: kept as sent.
        await stub.UpdateMemory(
            pb.UpdateMemoryRequest(memory=pb.Memory(memory_id=created[3].memory_id, user_id="alice", content="a cat naps"),
                                   update_mask={"paths": ["content"]}),
            metadata=auth("alice"),
        )  # fmt: skip
        own = f32(random_vector(random.Random(25), dim=256))
        mine = await create(stub, "alice", "my cat", own)
        for memory_id, expected in ((created[3].memory_id, wordllama.embed_batch(["a cat naps"])[0]), (mine.memory_id, own)):
            request = pb.GetMemoryRequest(user_id="alice", memory_id=memory_id, include_embedding=True)
            got_memory = await stub.GetMemory(request, metadata=as_alice)
            assert list(got_memory.memory.embedding) == pytest.approx(f32(expected), abs=1e-6)

        # Concurrent creates are embedded in batches, each with its own text.
        many = await asyncio.gather(*(create(stub, "bob", f"note number {i} about {FILLER[i % 10]}") for i in range(30)))
        for memory in many[:5]:
            request = pb.GetMemoryRequest(user_id="bob", memory_id=memory.memory_id, include_embedding=True)
            got_memory = await stub.GetMemory(request, metadata=auth("bob"))
            assert list(got_memory.memory.embedding) == pytest.approx(f32(wordllama.embed_batch([memory.content])[0]), abs=1e-6)


def test_embedder_dimension_mismatch_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="embedding_dim to 256"):
        nexus_config.from_sources(environ={"NEXUS_EMBEDDER": "wordllama"})  # the default dimension is 384
    with pytest.raises(ValueError, match="embedder must be one of"):
        nexus_config.from_sources(environ={"NEXUS_EMBEDDER": "word2vec"})
    config = nexus_config.from_sources(environ={"NEXUS_EMBEDDER": "wordllama", "NEXUS_EMBEDDING_DIM": "256"})
    assert config.embedder == "wordllama"


async def test_embedder_on_a_384_dimension_database_does_not_start(db_url: str) -> None:
    from nexus.migrations import MigrationError

    with pytest.raises(MigrationError, match="384-dimensional"):
        async with serving(db_url, embedder="wordllama", embedding_dim=256):
            pass


async def test_without_embedder_a_query_alone_is_text_only(clients: Clients) -> None:
    await create(clients.memories, "alice", "zebra", random_vector(random.Random(26)))
    got = await text_search(clients.memories, "alice", "zebra")
    assert len(got) == 1 and not got[0].HasField("distance")
    error = await rpc_error(clients.memories.SearchMemories(pb.SearchMemoriesRequest(user_id="alice"), metadata=auth("alice")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_search_racing_deletes_answers_from_one_snapshot(clients: Clients, db_url: str) -> None:
    """Searches of every mode while the user's memories are deleted one by one:
    each answer is a full page (the user always keeps more than top_k), as if it
    was read at one instant, never a page with a hole where a memory deleted
    between the search's statements was ranked."""
    stub = clients.memories
    rng = random.Random(39)
    query_vector = random_vector(rng)

    def near_memory() -> Awaitable[pb.Memory]:
        content = "zebra " + " ".join(rng.choices(FILLER, k=rng.randint(0, 4)))
        return create(stub, "alice", content, random_vector(rng, center=query_vector, spread=0.5))

    created = await asyncio.gather(*(near_memory() for _ in range(260)))
    doomed = [uuid.UUID(m.memory_id) for m in created[:240]]
    rng.shuffle(doomed)
    requests = [
        pb.SearchMemoriesRequest(user_id="alice", query="zebra", top_k=10),
        pb.SearchMemoriesRequest(user_id="alice", embedding=query_vector, top_k=10),
        pb.SearchMemoriesRequest(user_id="alice", query="zebra", embedding=query_vector, top_k=10),
    ]
    deleting = True
    searched = asyncio.Event()
    short: list[tuple[str, int]] = []  # (mode, results)

    async def search_until_done(request: pb.SearchMemoriesRequest) -> None:
        mode = "hybrid" if request.query and request.embedding else "text" if request.query else "vector"
        while deleting:
            results = (await stub.SearchMemories(request, metadata=auth("alice"))).results
            searched.set()
            if len(results) != 10:
                short.append((mode, len(results)))

    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)  # deletes faster than through the service
    assert pool is not None
    searchers = [asyncio.create_task(search_until_done(r)) for r in requests for _ in range(2)]
    try:
        for memory_id in doomed:
            searched.clear()
            await pool.execute("SELECT delete_memory('alice', $1)", memory_id)
            await asyncio.wait_for(searched.wait(), timeout=30)  # a search ends between deletes: they overlap
    finally:
        deleting = False
        await asyncio.gather(*searchers)
        await pool.close()
    assert short == []
