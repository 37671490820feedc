"""InteractionService.ListHomeFeed: what the viewer follows, newest first, one
item per entry, hydrated; follows, unfollows, deletions and undone
amplifications applied at the next page; privacy; broadcasters read at read
time; keyset pages that neither skip nor repeat while items arrive; and racing
clients checked against a model computed from the rows."""

from __future__ import annotations

import asyncio
import datetime
import random
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from nexus.server import NexusServer
from nexus.v1 import follow_pb2 as fpb
from nexus.v1 import interaction_pb2 as pb

from support.rpc import SERVICE, Clients, all_pages, auth, bad_request_fields, rpc_error

# The exactness tests (follows, unfollows, deletions, broadcasters, paging,
# racing clients) also run on the cluster; what only reads one node's
# answers back (reasons, privacy, input checks) runs on one node.

AUTHORED = pb.FEED_REASON_AUTHORED
AMPLIFIED = pb.FEED_REASON_AMPLIFIED

# --- helpers ------------------------------------------------------------------


async def post(clients: Clients, author: str, privacy: int = pb.PRIVACY_PUBLIC) -> str:
    request = pb.CreateEntryRequest(author_id=author, type="post", title=f"by {author}", privacy=privacy)
    return (await clients.interactions.CreateEntry(request, metadata=auth(author))).entry.entry_id


async def reply(clients: Clients, author: str, parent_id: str) -> str:
    request = pb.CreateBranchRequest(author_id=author, parent_entry_id=parent_id, type="reply")
    return (await clients.interactions.CreateBranch(request, metadata=auth(author))).entry.entry_id


async def amplify(clients: Clients, user: str, entry_id: str, on: bool = True) -> None:
    request = pb.SetAmplificationRequest(user_id=user, entry_id=entry_id, amplified=on)
    await clients.interactions.SetAmplification(request, metadata=auth(user))


async def follow(clients: Clients, follower: str, followed: str, on: bool = True) -> None:
    if on:
        await clients.follows.Follow(fpb.FollowRequest(follower_id=follower, followed_id=followed), metadata=auth(follower))
    else:
        await clients.follows.Unfollow(
            fpb.UnfollowRequest(follower_id=follower, followed_id=followed), metadata=auth(follower)
        )


async def feed_page(
    clients: Clients, viewer: str, page_size: int = 0, page_token: str = "", metadata: Any = None
) -> pb.ListHomeFeedResponse:
    request = pb.ListHomeFeedRequest(viewer_id=viewer, page_size=page_size, page_token=page_token)
    return await clients.interactions.ListHomeFeed(request, metadata=metadata or auth(viewer))


async def feed_pages(clients: Clients, viewer: str, page_size: int) -> list[list[pb.FeedItem]]:
    return await all_pages(lambda token: feed_page(clients, viewer, page_size, token), lambda page: page.items)


async def feed(clients: Clients, viewer: str, page_size: int = 100) -> list[tuple[str, int, list[str]]]:
    """The whole feed as (entry_id, reason, amplified_by sorted)."""
    return [
        (item.entry.entry_id, item.reason, sorted(item.amplified_by_user_ids))
        for page in await feed_pages(clients, viewer, page_size)
        for item in page
    ]


async def feed_ids(clients: Clients, viewer: str) -> list[str]:
    return [entry_id for entry_id, _, _ in await feed(clients, viewer)]


@dataclass(frozen=True)
class ModelItem:
    entry_id: str
    feed_time: datetime.datetime
    reason: int
    amplified_by: tuple[str, ...]


async def model_feed(db: asyncpg.Connection, viewer: str) -> list[ModelItem]:
    """The viewer's feed computed from the rows: root entries by the viewer and
    the accounts it follows, entries those accounts amplified; visible to the
    viewer, not deleted; placed at the newest such activity."""
    rows = await db.fetch(
        """
        WITH followed AS (SELECT followed_id FROM follows WHERE follower_id = $1),
        activity AS (
            SELECT e.entry_id, e.create_time AS at, NULL::text AS amplifier FROM entries e
            WHERE e.depth = 0 AND (e.author_id = $1 OR e.author_id IN (SELECT followed_id FROM followed))
            UNION ALL
            SELECT r.entry_id, r.create_time, r.user_id FROM reactions r
            WHERE r.kind = 'amplification' AND r.user_id IN (SELECT followed_id FROM followed)
        )
        SELECT a.entry_id, max(a.at) AS feed_time, bool_or(a.amplifier IS NULL) AS authored,
               coalesce(array_agg(a.amplifier ORDER BY a.amplifier) FILTER (WHERE a.amplifier IS NOT NULL), '{}')
                   AS amplified_by
        FROM activity a JOIN entries e ON e.entry_id = a.entry_id
        WHERE e.delete_time IS NULL
          AND (e.privacy = 'public' OR e.author_id = $1
               OR (e.privacy = 'followers' AND e.author_id IN (SELECT followed_id FROM followed)))
        GROUP BY a.entry_id
        ORDER BY max(a.at) DESC, a.entry_id DESC
        """,
        viewer,
    )
    return [
        ModelItem(str(r["entry_id"]), r["feed_time"], AUTHORED if r["authored"] else AMPLIFIED, tuple(r["amplified_by"]))
        for r in rows
    ]


async def assert_feed_matches_model(clients: Clients, db: asyncpg.Connection, viewer: str, page_size: int) -> None:
    served = [item for page in await feed_pages(clients, viewer, page_size) for item in page]
    expected = await model_feed(db, viewer)
    assert [
        (i.entry.entry_id, i.reason, tuple(sorted(i.amplified_by_user_ids)), i.feed_time.ToDatetime(datetime.UTC))
        for i in served
    ] == [(m.entry_id, m.reason, m.amplified_by, m.feed_time) for m in expected], viewer


async def assert_broadcast_copies_match(db: asyncpg.Connection) -> None:
    """broadcast_activities holds exactly the activities of the accounts that broadcast."""
    broadcasters = [r[0] for r in await db.fetch("SELECT user_id FROM feed_actors WHERE broadcast")]
    query = "SELECT actor_id, entry_id, reason, item_time FROM {} WHERE actor_id = ANY($1) ORDER BY 1, 2, 3"
    expected = [tuple(r) for r in await db.fetch(query.format("feed_activities"), broadcasters)]
    assert [tuple(r) for r in await db.fetch(query.format("broadcast_activities"), broadcasters)] == expected
    assert await db.fetchval("SELECT count(*) FROM broadcast_activities") == len(expected)


async def make_broadcaster(db: asyncpg.Connection, user: str) -> None:
    """Gives the user feed_broadcast_followers() followers (through follow()),
    then a post: the account broadcasts from then on."""
    await db.execute(
        "SELECT follow('fan-' || $1 || '-' || i, $1) FROM generate_series(1, feed_broadcast_followers()) i", user
    )


# --- what is in the feed ------------------------------------------------------


async def test_the_feed_holds_followed_posts_own_posts_and_followed_amplifications(clients: Clients) -> None:
    await follow(clients, "viewer", "alice")
    await follow(clients, "viewer", "bob")
    stranger_post = await post(clients, "carol")
    alice_post = await post(clients, "alice")
    await reply(clients, "alice", stranger_post)  # replies are not feed items
    own_post = await post(clients, "viewer")
    await amplify(clients, "bob", stranger_post)
    await post(clients, "carol")  # not followed, not amplified

    page = await feed_page(clients, "viewer")
    assert [(i.entry.entry_id, i.reason, list(i.amplified_by_user_ids)) for i in page.items] == [
        (stranger_post, AMPLIFIED, ["bob"]),
        (own_post, AUTHORED, []),
        (alice_post, AUTHORED, []),
    ]
    assert page.next_page_token == ""
    # Hydrated as GetEntries hydrates: counts and the viewer's own states.
    assert page.items[0].entry.counts.amplification_count == 1
    assert page.items[0].entry.counts.branch_count == 1
    assert [s.entry_id for s in page.states] == [i.entry.entry_id for i in page.items]


async def test_an_entry_amplified_by_several_followed_accounts_is_one_item_at_the_latest(clients: Clients) -> None:
    for followed in ("alice", "bob", "dave"):
        await follow(clients, "viewer", followed)
    old = await post(clients, "carol")
    newer = await post(clients, "alice")
    await amplify(clients, "bob", old)
    await amplify(clients, "dave", old)
    await amplify(clients, "alice", newer)  # the author's own amplification of its post

    items = (await feed_page(clients, "viewer")).items
    assert [(i.entry.entry_id, i.reason, sorted(i.amplified_by_user_ids)) for i in items] == [
        (newer, AUTHORED, ["alice"]),
        (old, AMPLIFIED, ["bob", "dave"]),
    ]
    assert items[0].feed_time.ToDatetime() > items[1].feed_time.ToDatetime()


@pytest.mark.cluster
async def test_a_follow_brings_the_accounts_items_and_an_unfollow_takes_them_away(
    clients: Clients, db: asyncpg.Connection
) -> None:
    alice_posts = [await post(clients, "alice") for _ in range(3)]
    elsewhere = await post(clients, "carol")
    await amplify(clients, "alice", elsewhere)
    assert await feed_ids(clients, "viewer") == []

    await follow(clients, "viewer", "alice")
    assert await feed_ids(clients, "viewer") == [elsewhere, *reversed(alice_posts)]
    await assert_feed_matches_model(clients, db, "viewer", 2)

    await follow(clients, "viewer", "alice", on=False)
    assert await feed_ids(clients, "viewer") == []
    assert await db.fetchval("SELECT count(*) FROM home_feed WHERE reader_id = 'viewer'") == 0


@pytest.mark.cluster
async def test_a_deleted_entry_and_an_undone_amplification_leave_at_once(clients: Clients) -> None:
    await follow(clients, "viewer", "alice")
    await follow(clients, "viewer", "bob")
    kept = await post(clients, "alice")
    deleted = await post(clients, "alice")
    amplified = await post(clients, "carol")
    await amplify(clients, "bob", amplified)
    assert await feed_ids(clients, "viewer") == [amplified, deleted, kept]

    request = pb.DeleteEntryRequest(user_id="alice", entry_id=deleted)
    await clients.interactions.DeleteEntry(request, metadata=auth("alice"))
    await amplify(clients, "bob", amplified, on=False)
    assert await feed_ids(clients, "viewer") == [kept]


async def test_an_amplification_undone_and_done_again_in_one_batch_moves_up(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await follow(clients, "viewer", "alice")
    amplified = await post(clients, "carol")
    await amplify(clients, "alice", amplified)
    later = await post(clients, "alice")
    assert await feed_ids(clients, "viewer") == [later, amplified]
    # One group-commit batch: alice's amplification off, then on again.
    await db.execute(
        "SELECT * FROM apply_reactions($1::uuid, ARRAY[$1::uuid, $1::uuid], '{toggle,toggle}',"
        " '{amplification,amplification}', '{alice,alice}')",
        amplified,
    )
    assert await feed_ids(clients, "viewer") == [amplified, later]
    await assert_feed_matches_model(clients, db, "viewer", 1)


async def test_a_copy_left_behind_by_an_unfollow_is_not_shown_and_a_new_follow_keeps_one(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await follow(clients, "viewer", "alice")
    posted = await post(clients, "alice")
    await follow(clients, "viewer", "alice", on=False)
    # What an unfollow leaves on Citus when it runs while the post's copy still commits.
    await db.execute(
        "INSERT INTO home_feed (reader_id, entry_id, actor_id, reason, item_time)"
        " SELECT 'viewer', entry_id, actor_id, reason, item_time FROM feed_activities WHERE entry_id = $1",
        posted,
    )
    assert await feed_ids(clients, "viewer") == []
    await follow(clients, "viewer", "alice")
    assert await feed_ids(clients, "viewer") == [posted]
    await assert_feed_matches_model(clients, db, "viewer", 1)


async def test_privacy_holds_in_the_feed(clients: Clients) -> None:
    await follow(clients, "viewer", "bob")
    await follow(clients, "bob", "carol")
    for_followers = await post(clients, "carol", pb.PRIVACY_FOLLOWERS)
    await amplify(clients, "bob", for_followers)  # bob may see it; the viewer may not
    private = await post(clients, "bob", pb.PRIVACY_PRIVATE)
    bobs_followers_only = await post(clients, "bob", pb.PRIVACY_FOLLOWERS)
    own_private = await post(clients, "viewer", pb.PRIVACY_PRIVATE)

    assert await feed_ids(clients, "viewer") == [own_private, bobs_followers_only]
    assert private not in await feed_ids(clients, "viewer")
    await follow(clients, "viewer", "carol")
    assert for_followers in await feed_ids(clients, "viewer")


# --- paging -------------------------------------------------------------------


@pytest.mark.cluster
async def test_pages_never_skip_or_repeat_while_items_arrive(clients: Clients, db: asyncpg.Connection) -> None:
    authors = [f"author-{i}" for i in range(6)]
    for author in authors:
        await follow(clients, "viewer", author)
    before = [await post(clients, random.choice(authors)) for _ in range(25)]
    for entry_id in random.sample(before, 8):
        await amplify(clients, random.choice(authors), entry_id)
    existing = [m.entry_id for m in await model_feed(db, "viewer")]

    seen: list[str] = []
    token = ""
    while True:
        page = await feed_page(clients, "viewer", 6, token)
        seen += [i.entry.entry_id for i in page.items]
        # New posts arrive between pages; they land above the pages already read.
        await asyncio.gather(*(post(clients, random.choice(authors)) for _ in range(3)))
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert [e for e in seen if e in set(existing)] == existing
    await assert_feed_matches_model(clients, db, "viewer", 9)


async def test_page_size_and_bad_input(clients: Clients) -> None:
    await follow(clients, "viewer", "alice")
    for _ in range(25):
        await post(clients, "alice")
    assert len((await feed_page(clients, "viewer")).items) == 20
    assert len((await feed_page(clients, "viewer", 1000)).items) == 25

    error = await rpc_error(feed_page(clients, "viewer", -1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_size"]
    error = await rpc_error(feed_page(clients, "viewer", 5, "not-a-token"))
    assert bad_request_fields(error) == ["page_token"]
    token = (await feed_page(clients, "viewer", 5)).next_page_token
    error = await rpc_error(feed_page(clients, "alice", 5, token))  # another reader's list
    assert bad_request_fields(error) == ["page_token"]
    error = await rpc_error(feed_page(clients, "", 5, metadata=SERVICE))
    assert bad_request_fields(error) == ["viewer_id"]


async def test_only_the_viewer_or_a_service_reads_a_feed(clients: Clients) -> None:
    await follow(clients, "viewer", "alice")
    entry_id = await post(clients, "alice")
    error = await rpc_error(feed_page(clients, "viewer", metadata=auth("mallory")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [i.entry.entry_id for i in (await feed_page(clients, "viewer", metadata=SERVICE)).items] == [entry_id]


async def test_the_feed_reaches_back_its_retention_and_maintenance_trims_older_activities(
    clients: Clients, db: asyncpg.Connection, server: NexusServer
) -> None:
    await follow(clients, "viewer", "alice")
    await follow(clients, "viewer", "star")
    old = await post(clients, "alice")
    recent = await post(clients, "alice")
    await make_broadcaster(db, "star")
    old_broadcast = await post(clients, "star")
    # As if written 40 days ago, past the 30 days a feed reaches back.
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    for table, column in (("entries", "create_time"), ("feed_activities", "item_time"), ("home_feed", "item_time"),
                          ("broadcast_activities", "item_time")):
        await db.execute(f"UPDATE {table} SET {column} = $2 WHERE entry_id = ANY($1)", [old, old_broadcast], long_ago)
    assert await feed_ids(clients, "viewer") == [recent]

    # The two old activities go, with the copy of alice's post; the recent one stays.
    assert await server.maintenance.trim_feeds() == 2
    assert await db.fetchval("SELECT count(*) FROM feed_activities WHERE entry_id = ANY($1)", [old, old_broadcast]) == 0
    await assert_broadcast_copies_match(db)
    assert await db.fetchval("SELECT count(*) FROM home_feed WHERE entry_id = $1", old) == 0
    assert await db.fetchval("SELECT count(*) FROM home_feed WHERE entry_id = $1", recent) == 1
    assert await server.maintenance.trim_feeds() == 0
    assert await feed_ids(clients, "viewer") == [recent]
    # A follow copies what the account still has; the reach still applies.
    await follow(clients, "newcomer", "alice")
    assert await feed_ids(clients, "newcomer") == [recent]


# --- broadcasters ---------------------------------------------------------------


@pytest.mark.cluster
async def test_a_broadcasters_items_are_read_at_read_time(clients: Clients, db: asyncpg.Connection) -> None:
    await follow(clients, "viewer", "star")
    await follow(clients, "viewer", "alice")
    before = await post(clients, "star")  # copied: star is not a broadcaster yet
    early = await post(clients, "carol")
    await amplify(clients, "star", early)  # copied too, and kept as star's activity
    await make_broadcaster(db, "star")
    after = await post(clients, "star")
    assert await db.fetchval("SELECT broadcast FROM feed_actors WHERE user_id = 'star'")
    assert await db.fetchval("SELECT count(*) FROM home_feed WHERE entry_id = $1", after) == 0
    by_alice = await post(clients, "alice")
    elsewhere = await post(clients, "carol")
    await amplify(clients, "star", elsewhere)
    await amplify(clients, "alice", elsewhere)

    assert await feed(clients, "viewer", 2) == [
        (elsewhere, AMPLIFIED, ["alice", "star"]),
        (by_alice, AUTHORED, []),
        (after, AUTHORED, []),
        (early, AMPLIFIED, ["star"]),
        (before, AUTHORED, []),
    ]
    await assert_feed_matches_model(clients, db, "viewer", 1)
    await assert_feed_matches_model(clients, db, "fan-star-7", 3)

    # A new follower sees the broadcaster's items at once; an unfollow removes them.
    await follow(clients, "newcomer", "star")
    await assert_feed_matches_model(clients, db, "newcomer", 2)
    assert len(await feed_ids(clients, "newcomer")) == 4
    await assert_broadcast_copies_match(db)
    await amplify(clients, "star", elsewhere, on=False)
    await follow(clients, "viewer", "star", on=False)
    assert await feed(clients, "viewer") == [(elsewhere, AMPLIFIED, ["alice"]), (by_alice, AUTHORED, [])]
    await assert_broadcast_copies_match(db)


@pytest.mark.cluster
async def test_broadcasters_racing_amplifications_keep_their_copy_exact(
    clients: Clients, db: asyncpg.Connection
) -> None:
    # Broadcasters from the start (their account rows say so), amplifying and undoing on a few
    # entries at once: a batch of one entry locks several accounts in turn, each writing or
    # removing its broadcast copy while others do the same. On Citus, with broadcast_activities'
    # writes not marked commutative, this failed with deadlocks (ABORTED) in 2 runs of 2.
    stars = [f"star-{i}" for i in range(6)]
    await db.executemany("INSERT INTO feed_actors (user_id, broadcast) VALUES ($1, true)", [(s,) for s in stars])
    entries = [await post(clients, "author") for _ in range(3)]
    rng = random.Random(20261208)

    async def star(user: str) -> None:
        for _ in range(20):
            await amplify(clients, user, rng.choice(entries), on=rng.random() < 0.5)

    await asyncio.gather(*(star(s) for s in stars for _ in range(3)))
    await assert_broadcast_copies_match(db)
    standing = {(r["user_id"], str(r["entry_id"])) for r in await db.fetch(
        "SELECT user_id, entry_id FROM reactions WHERE kind = 'amplification' AND user_id = ANY($1)", stars)}
    copied = {(r["actor_id"], str(r["entry_id"])) for r in await db.fetch(
        "SELECT actor_id, entry_id FROM broadcast_activities WHERE reason = 'amplified'")}
    assert copied == standing


# --- racing clients ---------------------------------------------------------------


@pytest.mark.cluster
async def test_racing_posts_amplifications_follows_and_pages_match_the_model(
    clients: Clients, db: asyncpg.Connection
) -> None:
    users = [f"user-{i}" for i in range(6)]
    posts: list[str] = [await post(clients, u) for u in users]
    rng = random.Random(20261207)

    async def actor(user: str) -> None:
        for _ in range(24):
            action = rng.random()
            other = rng.choice([u for u in users if u != user])
            if action < 0.3:
                posts.append(await post(clients, user, rng.choice([pb.PRIVACY_PUBLIC, pb.PRIVACY_FOLLOWERS])))
            elif action < 0.55:
                try:
                    await amplify(clients, user, rng.choice(posts), on=rng.random() < 0.7)
                except grpc.aio.AioRpcError as error:  # a FOLLOWERS post the user may not see
                    assert error.code() == grpc.StatusCode.NOT_FOUND
            elif action < 0.85:
                await follow(clients, user, other, on=rng.random() < 0.7)
            else:
                # Paging while everything changes: newest first, no entry twice on a page. (An
                # undone amplification or an unfollow between pages may list an entry again,
                # further down: docs/feed.md, Paging; arrivals alone are the test above.)
                pages = await feed_pages(clients, user, 4)
                assert all(len({i.entry.entry_id for i in page}) == len(page) for page in pages)
                times = [i.feed_time.ToDatetime() for page in pages for i in page]
                assert times == sorted(times, reverse=True)

    await asyncio.gather(*(actor(u) for u in users))
    for user in users:
        await assert_feed_matches_model(clients, db, user, 5)
