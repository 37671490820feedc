"""The home feed suite (``--suite feed``): pages, delivery, fan-out, storage.

The graph, at scale 1: 200k accounts whose follower counts fall off as a Zipf
law (rank r has 100k / r^0.65 followers: the top account 100k, about 20M edges
in all), and 100 heavy readers who follow 5,000 accounts each, among them the
50 most followed. Every account has written one post in the last week. It is
loaded set-based, writing the rows the stored functions write (follows, their
counters, broadcasters, activities, the copies in each follower's feed); what
is timed goes through the RPCs.

Figures, in one run: a first page of 20 hydrated items for a heavy reader and
for an ordinary one, and a second page, next to GetEntries of 20 ids (one
call in flight: latency); how soon a new post is in its followers' next page,
for an account of about 10k followers and one just under the broadcast
threshold; the fan-out rate of posts by accounts of 500-999 followers; the
bytes per feed row. The sampled readers' first pages are checked against the
rows before any figure is printed.
"""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import grpc

from bench.core import BenchFailed, Figures, Report, measure, percentiles, progress
from bench.targets import Target
from nexus import database
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import interaction_pb2_grpc

ACCOUNTS = 200_000
TOP_FOLLOWERS = 100_000
ZIPF_EXPONENT = 0.65
HEAVY_READERS = 100
HEAVY_FOLLOWING = 5000
CELEBRITIES = 50
PAGE = 20
DELIVERY_POSTS = 10  # posts timed per author kind
DELIVERY_READERS = 50  # followers sampled per post
DELIVERY_TIMEOUT_S = 10
# Fan-out is timed for at least FAN_OUT_S seconds: it writes all over two large
# indexes, and the first change to a page after a checkpoint writes the whole
# page to the WAL, so a short window (the first FAN_OUT_FIRST_S seconds are
# also reported) measures mostly those page images rather than the sustained rate.
FAN_OUT_S = 60
FAN_OUT_FIRST_S = 10


async def run_feed(target: Target, duration: float, concurrency: int, scale: float, report: Report) -> None:
    accounts = max(2000, round(ACCOUNTS * scale))
    conn = await database.connect(target.database_url)
    try:
        if await conn.fetchval("SELECT EXISTS (SELECT FROM follows WHERE follower_id LIKE 'feed-%')"):
            raise BenchFailed("feed: the database already holds the feed suite's accounts")
        edges = await _load(conn, accounts, scale)
        counts = {r["followed_id"]: r["n"] for r in await conn.fetch(
            "SELECT followed_id, count(*) AS n FROM follows WHERE followed_id LIKE 'feed-%' GROUP BY 1")}
        threshold = await conn.fetchval("SELECT feed_broadcast_followers()")
        heavy = [f"feed-reader-{i}" for i in range(1, HEAVY_READERS + 1)]
        ordinary = [r[0] for r in await conn.fetch(
            """SELECT follower_id FROM follows WHERE follower_id LIKE 'feed-%' AND follower_id NOT LIKE 'feed-reader-%'
               GROUP BY follower_id HAVING count(*) >= $1 ORDER BY random() LIMIT 200""", PAGE)]
        entry_ids = [str(r[0]) for r in await conn.fetch(
            "SELECT entry_id FROM entries WHERE author_id LIKE 'feed-%' ORDER BY random() LIMIT 2000")]

        report.add(f"target {target.label} {target.address}: {accounts} accounts, {edges} follows, "
                   f"{HEAVY_READERS} readers following {min(HEAVY_FOLLOWING, accounts // 2)} (the top {CELEBRITIES} "
                   f"among them), broadcasters from {threshold} followers; latency with 1 call in flight")
        figures: dict[str, Figures] = {}
        async with grpc.aio.insecure_channel(target.address) as channel:
            interactions = interaction_pb2_grpc.InteractionServiceStub(channel)

            async def first_page(readers: list[str]) -> pb.ListHomeFeedResponse:
                request = pb.ListHomeFeedRequest(viewer_id=random.choice(readers), page_size=PAGE)
                page = await interactions.ListHomeFeed(request, metadata=target.metadata)
                if len(page.items) < PAGE:
                    raise BenchFailed(f"feed: a page of {len(page.items)} items for {request.viewer_id}")
                return page

            async def second_page() -> None:
                reader = random.choice(heavy)
                page = await first_page([reader])
                request = pb.ListHomeFeedRequest(viewer_id=reader, page_size=PAGE, page_token=page.next_page_token)
                await interactions.ListHomeFeed(request, metadata=target.metadata)

            async def get_entries() -> None:
                request = pb.GetEntriesRequest(entry_ids=random.sample(entry_ids, PAGE), viewer_id=random.choice(heavy))
                await interactions.GetEntries(request, metadata=target.metadata)

            scenarios = {
                f"GetEntries of {PAGE} ids": get_entries,
                f"ListHomeFeed, heavy reader, {PAGE} items": lambda: first_page(heavy),
                f"ListHomeFeed, ordinary reader, {PAGE} items": lambda: first_page(ordinary),
                "ListHomeFeed first + second page": second_page,
            }
            for name, call in scenarios.items():
                figures[name] = await measure(name, call, duration, 1, target.processes)
                report.add(figures[name].line())

            for reader in heavy[:5] + ordinary[:5]:
                await _check_first_page(conn, interactions, target, reader)

            ten_k = min(counts, key=lambda a: abs(counts[a] - 10_000 * scale))
            below = max((a for a, n in counts.items() if n < threshold), key=lambda a: counts[a])
            delivery = {a: await _delivery(conn, interactions, target, a) for a in dict.fromkeys((ten_k, below))}

            fan_out_authors = [a for a, n in counts.items() if 500 <= n < threshold] or [below]

            async def fan_out_post() -> None:
                author = random.choice(fan_out_authors)
                await interactions.CreateEntry(pb.CreateEntryRequest(author_id=author, type="post", title="bench"),
                                               metadata=target.metadata)
                posted.append((time.perf_counter(), counts[author]))

            posted: list[tuple[float, int]] = []
            name = f"CreateEntry by {len(fan_out_authors)} authors of 500-{threshold - 1} followers"
            fan_out_s = max(duration, FAN_OUT_S)
            wal_before = await conn.fetchval("SELECT pg_current_wal_lsn()")
            started = time.perf_counter()
            figures[name] = await measure(name, fan_out_post, fan_out_s, concurrency, target.processes)
            elapsed = time.perf_counter() - started
            wal_bytes = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", wal_before)
            rows = sum(n for _, n in posted)
            rows_per_s = rows / elapsed
            first_rows_per_s = sum(n for at, n in posted if at - started <= FAN_OUT_FIRST_S) / FAN_OUT_FIRST_S
            report.add(figures[name].line())
            row_bytes = await conn.fetchval(
                "SELECT pg_total_relation_size('home_feed')::float8 / greatest(1, (SELECT count(*) FROM home_feed))")
    finally:
        await conn.close()

    get_p99 = figures[f"GetEntries of {PAGE} ids"].p99_ms
    report.add()
    for name in (f"ListHomeFeed, heavy reader, {PAGE} items", f"ListHomeFeed, ordinary reader, {PAGE} items"):
        report.add(f"{name + ', p99 (ms)':<58} {figures[name].p99_ms:7.2f}  (goal <= 15)  "
                   f"/ GetEntries p99 {figures[name].p99_ms / get_p99:5.2f}")
    for followers, create_ms, lags in delivery.values():
        p50, p99 = percentiles(lags)
        report.add(f"{'post by ' + str(followers) + '-follower account in next page (ms)':<58} p50 {p50:.0f}  "
                   f"p99 {p99:.0f}  (goal p99 <= 1000; CreateEntry p50 {create_ms:.1f} ms)")
    report.add(f"{'fan-out rows/s (posts by 500-' + str(threshold - 1) + ' follower accounts)':<58} "
               f"{rows_per_s:7.0f}  (goal >= 50000; over {elapsed:.0f} s, the first {FAN_OUT_FIRST_S} s "
               f"{first_rows_per_s:.0f})")
    report.add(f"{'WAL bytes per fan-out row':<58} {float(wal_bytes) / max(1, rows):7.0f}")
    report.add(f"{'bytes per home_feed row (table + indexes)':<58} {row_bytes:7.0f}")


async def _load(conn: asyncpg.Connection, accounts: int, scale: float) -> int:
    """Writes the graph, the counters, the broadcasters and one post per account; returns the follows."""
    top = max(10, round(TOP_FOLLOWERS * scale))
    following = min(HEAVY_FOLLOWING, accounts // 2)
    progress(f"feed: loading {accounts} accounts and their follows (top account {top} followers)")
    await conn.execute(
        """INSERT INTO follows (follower_id, followed_id, create_time)
           SELECT follower, followed, now() - interval '30 days' FROM (
               SELECT 'feed-' || (1 + floor(random() * $1))::int AS follower, 'feed-' || r AS followed
               FROM generate_series(1, $1) r
               CROSS JOIN LATERAL generate_series(1, greatest(1, round($2 / r ^ $3))::int)) edge
           WHERE follower <> followed
           ON CONFLICT DO NOTHING""",
        accounts, float(top), ZIPF_EXPONENT,
    )
    await conn.execute(
        """INSERT INTO follows (follower_id, followed_id, create_time)
           SELECT 'feed-reader-' || reader, 'feed-' || followed, now() - interval '30 days'
           FROM generate_series(1, $1) reader
           CROSS JOIN LATERAL (SELECT generate_series(1, $2) AS followed
                               UNION SELECT ($2 + 1 + floor(random() * ($4 - $2)))::int
                               FROM generate_series(1, $3 * 2) LIMIT $3) chosen
           ON CONFLICT DO NOTHING""",
        HEAVY_READERS, CELEBRITIES, following, accounts,
    )
    progress("feed: counters and broadcasters")
    await conn.execute(
        """INSERT INTO follow_counter_shards (user_id, shard, follower_count, following_count)
           SELECT user_id, shard, sum(followers), sum(followings) FROM (
               SELECT followed_id AS user_id, counter_shard(follower_id) AS shard, 1 AS followers, 0 AS followings
               FROM follows WHERE followed_id LIKE 'feed-%'
               UNION ALL
               SELECT follower_id, counter_shard(followed_id), 0, 1 FROM follows WHERE follower_id LIKE 'feed-%') c
           GROUP BY user_id, shard"""
    )
    await conn.execute(
        """INSERT INTO feed_actors (user_id, broadcast)
           SELECT followed_id, true FROM follows WHERE followed_id LIKE 'feed-%'
           GROUP BY followed_id HAVING count(*) >= feed_broadcast_followers()"""
    )
    await conn.execute(
        "UPDATE follows SET broadcast = true WHERE followed_id IN (SELECT user_id FROM feed_actors WHERE broadcast)"
    )
    progress("feed: one post per account, copied into the followers' feeds")
    await conn.execute(
        """INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type, title,
                                content, privacy, tags, metadata, create_time, update_time)
           SELECT id, 'feed-' || r, id, 0, 0, '{}', 'post', 'bench', '', 'public', '{}', '{}', at, at
           FROM (SELECT r, gen_random_uuid() AS id, now() - random() * interval '7 days' AS at
                 FROM generate_series(1, $1) r) p""",
        accounts,
    )
    await conn.execute(
        """INSERT INTO feed_activities (actor_id, entry_id, reason, item_time, fanned_out)
           SELECT e.author_id, e.entry_id, 'authored', e.create_time, a.user_id IS NULL
           FROM entries e LEFT JOIN feed_actors a ON a.user_id = e.author_id AND a.broadcast
           WHERE e.author_id LIKE 'feed-%'"""
    )
    await conn.execute(
        """INSERT INTO broadcast_activities (actor_id, entry_id, reason, item_time)
           SELECT actor_id, entry_id, reason, item_time FROM feed_activities
           WHERE NOT fanned_out AND actor_id LIKE 'feed-%'"""
    )
    await conn.execute(
        """INSERT INTO home_feed (reader_id, entry_id, actor_id, reason, item_time)
           SELECT f.follower_id, a.entry_id, a.actor_id, a.reason, a.item_time
           FROM feed_activities a JOIN follows f ON f.followed_id = a.actor_id
           WHERE a.fanned_out AND a.actor_id LIKE 'feed-%'"""
    )
    progress("feed: VACUUM ANALYZE")
    for table in ("follows", "follow_counter_shards", "feed_actors", "feed_activities", "broadcast_activities",
                  "home_feed", "entries"):
        await conn.execute(f"VACUUM ANALYZE {table}")
    return int(await conn.fetchval("SELECT count(*) FROM follows WHERE follower_id LIKE 'feed-%'"))


async def _check_first_page(
    conn: asyncpg.Connection, interactions: interaction_pb2_grpc.InteractionServiceAsyncStub, target: Target, reader: str
) -> None:
    """The reader's first page is the newest PAGE posts of the accounts it follows (the bench's
    only activities before the delivery posts)."""
    expected = [str(r[0]) for r in await conn.fetch(
        """SELECT e.entry_id FROM entries e
           WHERE e.author_id IN (SELECT followed_id FROM follows WHERE follower_id = $1) OR e.author_id = $1
           ORDER BY e.create_time DESC, e.entry_id DESC LIMIT $2""", reader, PAGE)]
    page = await interactions.ListHomeFeed(pb.ListHomeFeedRequest(viewer_id=reader, page_size=PAGE),
                                           metadata=target.metadata)
    if [i.entry.entry_id for i in page.items] != expected:
        raise BenchFailed(f"feed: {reader}'s first page is not the newest posts of the accounts it follows")


async def _delivery(
    conn: asyncpg.Connection, interactions: interaction_pb2_grpc.InteractionServiceAsyncStub, target: Target, author: str
) -> tuple[int, float, list[float]]:
    """(followers, CreateEntry p50 ms, lags ms): for each of DELIVERY_POSTS posts by the author,
    the time from the CreateEntry call until each of DELIVERY_READERS sampled followers' next
    first page holds it."""
    followers = [r[0] for r in await conn.fetch("SELECT follower_id FROM follows WHERE followed_id = $1", author)]
    progress(f"feed: delivery of posts by {author} ({len(followers)} followers)")
    creates: list[float] = []
    lags: list[float] = []
    gate = asyncio.Semaphore(8)

    async def seen_by(reader: str, entry_id: str, started: float) -> float:
        async with gate:
            while time.perf_counter() - started < DELIVERY_TIMEOUT_S:
                page = await interactions.ListHomeFeed(pb.ListHomeFeedRequest(viewer_id=reader, page_size=PAGE),
                                                       metadata=target.metadata)
                if any(i.entry.entry_id == entry_id for i in page.items):
                    return (time.perf_counter() - started) * 1000
            raise BenchFailed(f"feed: a post by {author} was not in {reader}'s feed after {DELIVERY_TIMEOUT_S} s")

    for _ in range(DELIVERY_POSTS):
        started = time.perf_counter()
        created = await interactions.CreateEntry(pb.CreateEntryRequest(author_id=author, type="post", title="bench"),
                                                 metadata=target.metadata)
        creates.append((time.perf_counter() - started) * 1000)
        readers = random.sample(followers, min(DELIVERY_READERS, len(followers)))
        lags += await asyncio.gather(*(seen_by(r, created.entry.entry_id, started) for r in readers))
    return len(followers), percentiles(creates)[0], lags
