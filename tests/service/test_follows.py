"""FollowService: idempotent Follow / Unfollow, batch counts and states, keyset
lists (also while followers arrive), auth, FOLLOWERS visibility of entries, the
promise that every sharded counter equals the edges it counts under racing
clients, and reconcile finding and repairing drift."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from typing import Any

import asyncpg
import grpc
import pytest

from nexus.v1 import follow_pb2 as pb
from nexus.v1 import interaction_pb2 as ipb

from support.rpc import JWT_SECRET, SERVICE, Clients, all_pages, auth, bad_request_fields, rpc_error

pytestmark = pytest.mark.cluster

# --- helpers ------------------------------------------------------------------


async def follow(clients: Clients, follower: str, followed: str, metadata: Any = None) -> pb.FollowResponse:
    request = pb.FollowRequest(follower_id=follower, followed_id=followed)
    return await clients.follows.Follow(request, metadata=metadata or auth(follower))


async def unfollow(clients: Clients, follower: str, followed: str, metadata: Any = None) -> pb.UnfollowResponse:
    request = pb.UnfollowRequest(follower_id=follower, followed_id=followed)
    return await clients.follows.Unfollow(request, metadata=metadata or auth(follower))


async def follow_counts(clients: Clients, user_ids: list[str], metadata: Any = SERVICE) -> list[pb.FollowCounts]:
    response = await clients.follows.GetFollowCounts(pb.GetFollowCountsRequest(user_ids=user_ids), metadata=metadata)
    return list(response.counts)


async def follow_states(
    clients: Clients, user_id: str, others: list[str], metadata: Any = SERVICE
) -> list[pb.FollowState]:
    request = pb.GetFollowStatesRequest(user_id=user_id, other_user_ids=others)
    return list((await clients.follows.GetFollowStates(request, metadata=metadata)).states)


LISTS = {
    "ListFollowers": pb.ListFollowersRequest,
    "ListFollowing": pb.ListFollowingRequest,
}


async def list_page(
    clients: Clients, rpc: str, user_id: str, page_size: int = 0, page_token: str = "", metadata: Any = SERVICE
) -> Any:
    request = LISTS[rpc](user_id=user_id, page_size=page_size, page_token=page_token)
    return await getattr(clients.follows, rpc)(request, metadata=metadata)


async def list_pages(clients: Clients, rpc: str, user_id: str, page_size: int, metadata: Any = SERVICE) -> list[list[str]]:
    """Every page of a list, following next_page_token to the end."""
    return await all_pages(
        lambda token: list_page(clients, rpc, user_id, page_size, token, metadata), lambda page: page.user_ids
    )


def flat(pages: list[list[str]]) -> list[str]:
    return [u for page in pages for u in page]


async def edges(db: asyncpg.Connection) -> set[tuple[str, str]]:
    return {(r[0], r[1]) for r in await db.fetch("SELECT follower_id, followed_id FROM follows")}


async def edge_counts(db: asyncpg.Connection, user: str) -> tuple[int, int]:
    """(followers, following) of user, counted from the edges."""
    row = await db.fetchrow(
        """SELECT count(*) FILTER (WHERE followed_id = $1), count(*) FILTER (WHERE follower_id = $1)
           FROM follows WHERE $1 IN (follower_id, followed_id)""",
        user,
    )
    return row[0], row[1]


async def drift(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM reconcile_follow_counters(false)")


async def assert_counters_exact(clients: Clients, db: asyncpg.Connection, users: list[str]) -> None:
    """Each served count equals the edges it counts, and reconcile finds no drift."""
    served = await follow_counts(clients, users)
    assert [c.user_id for c in served] == users
    for c in served:
        assert (c.follower_count, c.following_count) == await edge_counts(db, c.user_id), c.user_id
    assert await drift(db) == 0


async def nothing_written(db: asyncpg.Connection) -> bool:
    return await db.fetchval("SELECT NOT EXISTS (SELECT 1 FROM follows) AND NOT EXISTS (SELECT 1 FROM follow_counter_shards)")


# --- Follow and Unfollow ------------------------------------------------------


async def test_follow_and_unfollow_are_idempotent(clients: Clients, db: asyncpg.Connection) -> None:
    outcomes = [
        await follow(clients, "bob", "alice"),
        await follow(clients, "bob", "alice"),
        await unfollow(clients, "bob", "alice"),
        await unfollow(clients, "bob", "alice"),
        await follow(clients, "bob", "alice"),
    ]

    assert [(o.following, o.changed) for o in outcomes] == [
        (True, True), (True, False), (False, True), (False, False), (True, True)
    ]
    assert await edges(db) == {("bob", "alice")}
    assert await follow_counts(clients, ["alice", "bob"]) == [
        pb.FollowCounts(user_id="alice", follower_count=1),
        pb.FollowCounts(user_id="bob", following_count=1),
    ]
    await assert_counters_exact(clients, db, ["alice", "bob"])


async def test_unfollow_of_a_missing_edge_changes_nothing(clients: Clients, db: asyncpg.Connection) -> None:
    await follow(clients, "alice", "bob")  # the other direction must stay untouched

    response = await unfollow(clients, "bob", "alice")

    assert (response.following, response.changed) == (False, False)
    assert await edges(db) == {("alice", "bob")}
    await assert_counters_exact(clients, db, ["alice", "bob"])


async def test_users_need_not_exist_and_follow_state_is_directed(clients: Clients, db: asyncpg.Connection) -> None:
    follower, followed = "ghost.1@example:x", "never-seen_2"

    assert (await follow(clients, follower, followed)).changed

    assert await follow_states(clients, follower, [followed]) == [
        pb.FollowState(user_id=followed, following=True, followed_by=False)
    ]
    assert await follow_states(clients, followed, [follower]) == [
        pb.FollowState(user_id=follower, following=False, followed_by=True)
    ]
    await assert_counters_exact(clients, db, [follower, followed])


@pytest.mark.refused_in_python
@pytest.mark.parametrize("as_service", [False, True], ids=["user-token", "service-token"])
async def test_following_yourself_is_invalid_argument(clients: Clients, db: asyncpg.Connection, as_service: bool) -> None:
    error = await rpc_error(follow(clients, "alice", "alice", metadata=SERVICE if as_service else None))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["followed_id"]
    assert await nothing_written(db)


@pytest.mark.refused_in_python
@pytest.mark.parametrize("rpc", ["Follow", "Unfollow"])
@pytest.mark.parametrize(
    ("follower", "followed", "field"),
    [
        ("", "bob", "follower_id"),
        ("al ice", "bob", "follower_id"),
        ("x" * 129, "bob", "follower_id"),
        ("alice", "", "followed_id"),
        ("alice", "bob/", "followed_id"),
    ],
)
async def test_edge_with_a_bad_user_id_is_invalid_argument(
    clients: Clients, db: asyncpg.Connection, rpc: str, follower: str, followed: str, field: str
) -> None:
    request = (pb.FollowRequest if rpc == "Follow" else pb.UnfollowRequest)(follower_id=follower, followed_id=followed)

    error = await rpc_error(getattr(clients.follows, rpc)(request, metadata=SERVICE))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [field]
    assert await nothing_written(db)


# --- Auth ---------------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["Follow", "Unfollow"])
async def test_acting_as_someone_else_is_permission_denied(clients: Clients, db: asyncpg.Connection, rpc: str) -> None:
    await follow(clients, "bob", "alice")
    before = await db.fetch("SELECT * FROM follow_counter_shards ORDER BY user_id, shard")
    call = follow if rpc == "Follow" else unfollow

    denied = [
        await rpc_error(call(clients, "bob", "alice", metadata=auth("mallory"))),  # the existing edge
        await rpc_error(call(clients, "bob", "carol", metadata=auth("mallory"))),  # a new one
        await rpc_error(call(clients, "bob", "mallory", metadata=auth("mallory"))),  # "make bob follow me"
    ]

    assert [e.code() for e in denied] == [grpc.StatusCode.PERMISSION_DENIED] * 3
    assert await edges(db) == {("bob", "alice")}
    assert await db.fetch("SELECT * FROM follow_counter_shards ORDER BY user_id, shard") == before


async def test_a_service_may_act_for_anyone(clients: Clients, db: asyncpg.Connection) -> None:
    assert (await follow(clients, "bob", "alice", metadata=SERVICE)).changed
    assert (await follow(clients, "carol", "alice", metadata=SERVICE)).changed
    assert (await unfollow(clients, "bob", "alice", metadata=SERVICE)).changed

    assert await edges(db) == {("carol", "alice")}
    await assert_counters_exact(clients, db, ["alice", "bob", "carol"])


NO_TOKEN_CALLS = {
    "Follow": pb.FollowRequest(follower_id="bob", followed_id="alice"),
    "Unfollow": pb.UnfollowRequest(follower_id="bob", followed_id="alice"),
    "GetFollowCounts": pb.GetFollowCountsRequest(user_ids=["alice"]),
    "GetFollowStates": pb.GetFollowStatesRequest(user_id="alice", other_user_ids=["bob"]),
    "ListFollowers": pb.ListFollowersRequest(user_id="alice"),
    "ListFollowing": pb.ListFollowingRequest(user_id="bob"),
}


@pytest.mark.refused_in_python
@pytest.mark.parametrize("rpc", list(NO_TOKEN_CALLS))
async def test_no_token_is_unauthenticated(clients: Clients, db: asyncpg.Connection, rpc: str) -> None:
    for metadata in [None, (("authorization", "Bearer not-a-jwt"),)]:
        error = await rpc_error(getattr(clients.follows, rpc)(NO_TOKEN_CALLS[rpc], metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await nothing_written(db)


async def test_the_graph_is_public_to_any_authenticated_user(clients: Clients) -> None:
    await follow(clients, "bob", "alice")
    stranger = auth("mallory")

    assert await follow_counts(clients, ["alice"], metadata=stranger) == [pb.FollowCounts(user_id="alice", follower_count=1)]
    assert await follow_states(clients, "bob", ["alice"], metadata=stranger) == [
        pb.FollowState(user_id="alice", following=True)
    ]
    assert (await list_page(clients, "ListFollowers", "alice", metadata=stranger)).user_ids == ["bob"]
    assert (await list_page(clients, "ListFollowing", "bob", metadata=stranger)).user_ids == ["alice"]


# --- GetFollowCounts and GetFollowStates ----------------------------------------


async def test_follow_counts_in_the_order_asked_with_duplicates_collapsed(clients: Clients) -> None:
    # alice <- bob, carol, dave; bob -> carol; carol -> bob
    for follower, followed in [("bob", "alice"), ("carol", "alice"), ("dave", "alice"), ("bob", "carol"), ("carol", "bob")]:
        await follow(clients, follower, followed)

    result = await follow_counts(clients, ["dave", "nobody", "alice", "bob", "dave", "carol", "alice"])

    assert result == [
        pb.FollowCounts(user_id="dave", follower_count=0, following_count=1),
        pb.FollowCounts(user_id="nobody", follower_count=0, following_count=0),
        pb.FollowCounts(user_id="alice", follower_count=3, following_count=0),
        pb.FollowCounts(user_id="bob", follower_count=1, following_count=2),
        pb.FollowCounts(user_id="carol", follower_count=1, following_count=2),
    ]


async def test_follow_states_in_the_order_asked_in_both_directions(clients: Clients) -> None:
    await follow(clients, "alice", "bob")  # alice follows bob
    await follow(clients, "carol", "alice")  # carol follows alice
    await follow(clients, "alice", "dave")  # mutual
    await follow(clients, "dave", "alice")
    await follow(clients, "bob", "carol")  # not about alice at all

    result = await follow_states(clients, "alice", ["erin", "dave", "bob", "carol", "bob", "erin"])

    assert result == [
        pb.FollowState(user_id="erin", following=False, followed_by=False),
        pb.FollowState(user_id="dave", following=True, followed_by=True),
        pb.FollowState(user_id="bob", following=True, followed_by=False),
        pb.FollowState(user_id="carol", following=False, followed_by=True),
    ]


@pytest.mark.parametrize(
    ("rpc", "field"), [("GetFollowCounts", "user_ids"), ("GetFollowStates", "other_user_ids")]
)
async def test_batches_take_up_to_1000_ids(clients: Clients, rpc: str, field: str) -> None:
    def request(n: int) -> Any:
        ids = [f"user{i}" for i in range(n)]
        if rpc == "GetFollowCounts":
            return pb.GetFollowCountsRequest(user_ids=ids)
        return pb.GetFollowStatesRequest(user_id="alice", other_user_ids=ids)

    response = await getattr(clients.follows, rpc)(request(1000), metadata=SERVICE)
    assert len(response.counts if rpc == "GetFollowCounts" else response.states) == 1000

    error = await rpc_error(getattr(clients.follows, rpc)(request(1001), metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [field]


@pytest.mark.refused_in_python
@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "emoji\u2603"])
async def test_batch_with_a_bad_id_names_its_index(clients: Clients, bad: str) -> None:
    counts_request = pb.GetFollowCountsRequest(user_ids=["alice", bad])
    error = await rpc_error(clients.follows.GetFollowCounts(counts_request, metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["user_ids[1]"]

    request = pb.GetFollowStatesRequest(user_id="alice", other_user_ids=["bob", "carol", bad])
    error = await rpc_error(clients.follows.GetFollowStates(request, metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["other_user_ids[2]"]

    request = pb.GetFollowStatesRequest(user_id=bad, other_user_ids=["bob"])
    error = await rpc_error(clients.follows.GetFollowStates(request, metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["user_id"]


# --- ListFollowers and ListFollowing ------------------------------------------


async def test_list_followers_newest_first_across_pages(clients: Clients) -> None:
    followers = [f"fan{i}" for i in range(8)]
    for user in followers:
        await follow(clients, user, "star")
    await unfollow(clients, "fan3", "star")
    await follow(clients, "fan0", "star")  # no-op: fan0 keeps its old place
    await follow(clients, "star", "fan5")  # the other direction is not a follower

    pages = await list_pages(clients, "ListFollowers", "star", page_size=3)

    expected = [u for u in followers if u != "fan3"][::-1]
    assert pages == [expected[0:3], expected[3:6], expected[6:7]]


async def test_list_following_newest_first_across_pages(clients: Clients) -> None:
    followed = [f"idol{i}" for i in range(7)]
    for user in followed:
        await follow(clients, "fan", user)
    await follow(clients, "idol2", "fan")  # a follower of fan, not followed by fan

    pages = await list_pages(clients, "ListFollowing", "fan", page_size=2)

    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert flat(pages) == followed[::-1]
    assert await list_pages(clients, "ListFollowers", "fan", page_size=2) == [["idol2"]]


@pytest.mark.parametrize("rpc", list(LISTS))
async def test_list_of_a_user_without_edges_is_one_empty_page(clients: Clients, rpc: str) -> None:
    response = await list_page(clients, rpc, "loner")
    assert (list(response.user_ids), response.next_page_token) == ([], "")


async def test_list_pages_exactly_through_followers_of_one_instant(clients: Clients, db: asyncpg.Connection) -> None:
    followers = {f"fan{i}" for i in range(7)}
    # One statement, one create_time: a tie the page token must break.
    await db.execute(
        "INSERT INTO follows (follower_id, followed_id, create_time) SELECT u, 'star', now() FROM unnest($1::text[]) u",
        sorted(followers),
    )

    listed = flat(await list_pages(clients, "ListFollowers", "star", page_size=3))

    assert len(listed) == len(followers)
    assert set(listed) == followers


async def test_pagination_under_concurrent_follows_never_repeats_or_skips(clients: Clients, db: asyncpg.Connection) -> None:
    originals = [f"old{i:02}" for i in range(60)]
    newcomers = [f"new{i:02}" for i in range(40)]
    await asyncio.gather(*(follow(clients, u, "star", metadata=SERVICE) for u in originals))
    expected_originals = [r[0] for r in await db.fetch(
        "SELECT follower_id FROM follows WHERE followed_id = 'star' ORDER BY create_time DESC, follower_id DESC"
    )]
    pages_seen: asyncio.Queue[bool] = asyncio.Queue()

    async def pager() -> list[list[str]]:
        pages, token = [], ""
        try:
            while True:
                response = await list_page(clients, "ListFollowers", "star", page_size=7, page_token=token)
                pages.append(list(response.user_ids))
                pages_seen.put_nowait(True)
                token = response.next_page_token
                if not token:
                    return pages
        finally:
            pages_seen.put_nowait(False)  # done: the inserter stops waiting for pages

    async def inserter() -> None:
        # Waves of 5 concurrent follows; after the first, each wave starts when
        # the pager has fetched another page, so it races the next page's fetch.
        paging = True
        for wave in range(0, len(newcomers), 5):
            if wave and paging:
                paging = await pages_seen.get()
            await asyncio.gather(*(follow(clients, u, "star", metadata=SERVICE) for u in newcomers[wave : wave + 5]))

    pages, _ = await asyncio.gather(pager(), inserter())

    listed = flat(pages)
    assert all(len(page) <= 7 for page in pages)
    assert len(listed) == len(set(listed)), "a follower was listed twice"
    assert set(listed) <= set(originals) | set(newcomers)
    assert [u for u in listed if u in set(originals)] == expected_originals  # each once, newest first
    assert len(pages) > 60 // 7
    # Afterwards, everyone is there.
    assert sorted(flat(await list_pages(clients, "ListFollowers", "star", page_size=7))) == sorted(originals + newcomers)


@pytest.mark.refused_in_python
@pytest.mark.parametrize("rpc", list(LISTS))
async def test_list_rejects_garbage_and_foreign_page_tokens(clients: Clients, rpc: str) -> None:
    for i in range(3):
        await follow(clients, f"u{i}", "alice")
        await follow(clients, "alice", f"v{i}")
        await follow(clients, f"u{i}", "bob")
        await follow(clients, "bob", f"v{i}")
    token = (await list_page(clients, rpc, "alice", page_size=1)).next_page_token
    other_rpc = next(r for r in LISTS if r != rpc)
    assert token

    bad_calls = [
        list_page(clients, rpc, "alice", page_token="garbage"),
        list_page(clients, rpc, "alice", page_token=token[:-2] + ("AA" if token[-2:] != "AA" else "BB")),
        list_page(clients, rpc, "bob", page_token=token),  # another user's list
        list_page(clients, other_rpc, "alice", page_token=token),  # the other direction
    ]
    for call in bad_calls:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error) == ["page_token"]

    assert len((await list_page(clients, rpc, "alice", page_size=1, page_token=token)).user_ids) == 1


@pytest.mark.refused_in_python
@pytest.mark.parametrize("rpc", list(LISTS))
async def test_list_page_size_rules(clients: Clients, rpc: str) -> None:
    error = await rpc_error(list_page(clients, rpc, "alice", page_size=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_size"]

    error = await rpc_error(list_page(clients, rpc, "not valid"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["user_id"]


# --- Concurrency: racing clients over one channel -----------------------------


async def test_concurrent_follows_of_one_pair_make_one_edge(clients: Clients, db: asyncpg.Connection) -> None:
    responses = await asyncio.gather(*(follow(clients, "bob", "alice") for _ in range(50)))

    assert all(r.following for r in responses)
    assert sorted(r.changed for r in responses) == [False] * 49 + [True]
    assert await edges(db) == {("bob", "alice")}
    assert await follow_counts(clients, ["alice", "bob"]) == [
        pb.FollowCounts(user_id="alice", follower_count=1),
        pb.FollowCounts(user_id="bob", following_count=1),
    ]
    await assert_counters_exact(clients, db, ["alice", "bob"])


async def test_concurrent_unfollows_of_one_pair_remove_it_once(clients: Clients, db: asyncpg.Connection) -> None:
    await follow(clients, "bob", "alice")

    responses = await asyncio.gather(*(unfollow(clients, "bob", "alice") for _ in range(50)))

    assert sorted(r.changed for r in responses) == [False] * 49 + [True]
    assert await edges(db) == set()
    await assert_counters_exact(clients, db, ["alice", "bob"])


async def test_mutual_follows_racing_both_ways_do_not_deadlock(clients: Clients, db: asyncpg.Connection) -> None:
    users = [f"user{i}" for i in range(12)]
    pairs = [(a, b) for a in users for b in users if a != b]

    followed = await asyncio.gather(*(follow(clients, a, b) for a, b in pairs))
    assert all(r.changed for r in followed)
    assert await follow_counts(clients, users) == [
        pb.FollowCounts(user_id=u, follower_count=11, following_count=11) for u in users
    ]
    await assert_counters_exact(clients, db, users)

    # Now every a -> b unfollow races b -> a being unfollowed and a -> b being re-followed.
    rng = random.Random(7)
    calls = [unfollow(clients, a, b) for a, b in pairs] + [follow(clients, a, b) for a, b in rng.sample(pairs, 40)]
    rng.shuffle(calls)
    await asyncio.gather(*calls)

    await assert_counters_exact(clients, db, users)
    for user in users:
        expected = {b for a, b in await edges(db) if a == user}
        states = await follow_states(clients, user, [u for u in users if u != user])
        assert {s.user_id for s in states if s.following} == expected


async def lock_waiters(db: asyncpg.Connection) -> int:
    """Backends of this database currently blocked on a lock."""
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )


async def until_lock_waiters(db: asyncpg.Connection, n: int, timeout: float = 10.0) -> None:
    """Polls (bounded) until exactly n backends wait on a lock."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await lock_waiters(db) != n:
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {n} lock waiter(s); have {await lock_waiters(db)}")
        await asyncio.sleep(0.01)


@pytest.mark.single_node("counts lock waiters in the one server's pg_stat_activity; on the cluster they wait on "
                         "the worker owning the row (test_hot_mutual_pairs_race_without_deadlock runs there)")
@pytest.mark.parametrize("rpc", ["Follow", "Unfollow"])
async def test_mutual_edges_lock_counter_rows_in_one_order(
    clients: Clients, db: asyncpg.Connection, db_url: str, rpc: str
) -> None:
    """Deterministic deadlock check: alice -> bob and bob -> alice touch the same
    two counter rows. We hold the higher row, queue alice -> bob first and then
    bob -> alice, and release. A consistent lock order makes them finish one
    after the other; an inconsistent one is a deadlock (an error after 1 s)."""
    await follow(clients, "alice", "bob")  # creates both counter rows
    await follow(clients, "bob", "alice")
    if rpc == "Follow":
        await unfollow(clients, "alice", "bob")
        await unfollow(clients, "bob", "alice")
    call = follow if rpc == "Follow" else unfollow
    holder = await asyncpg.connect(db_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT FROM follow_counter_shards WHERE user_id = 'bob' AND shard = counter_shard('alice') FOR UPDATE"
            )
            first = asyncio.create_task(call(clients, "alice", "bob"))
            await until_lock_waiters(db, 1)
            second = asyncio.create_task(call(clients, "bob", "alice"))
            await until_lock_waiters(db, 2)
        responses = await asyncio.gather(first, second)
    finally:
        await holder.close()

    assert [r.changed for r in responses] == [True, True]
    assert await edges(db) == ({("alice", "bob"), ("bob", "alice")} if rpc == "Follow" else set())
    await assert_counters_exact(clients, db, ["alice", "bob"])


def assert_changes_explain_edges(
    plan: list[tuple[str, str, str]], responses: list[Any], graph: set[tuple[str, str]]
) -> None:
    """Starting from no edges, each edge's successful follows and unfollows alternate,
    and an edge exists iff its follows changed it once more than its unfollows."""
    balance: dict[tuple[str, str], int] = {}
    for r, (kind, a, b) in zip(responses, plan, strict=True):
        assert r.following == (kind == "follow")
        if r.changed:
            balance[(a, b)] = balance.get((a, b), 0) + (1 if kind == "follow" else -1)
    assert set(balance.values()) <= {0, 1}
    assert {pair for pair, n in balance.items() if n == 1} == graph


async def test_hot_mutual_pairs_race_without_deadlock(clients: Clients, db: asyncpg.Connection) -> None:
    # Both edges of a mutual pair change the same two counter rows, in opposite
    # roles: only a consistent lock order keeps a -> b and b -> a from deadlocking.
    users = [f"user{i}" for i in range(16)]
    pairs = list(zip(users[0::2], users[1::2], strict=True))
    plan = [
        ("follow" if n % 2 == 0 else "unfollow", x, y)
        for n in range(100)
        for a, b in pairs
        for x, y in ((a, b), (b, a))
    ]

    responses = await asyncio.gather(
        *((follow if kind == "follow" else unfollow)(clients, a, b) for kind, a, b in plan)
    )

    assert_changes_explain_edges(plan, responses, await edges(db))
    await assert_counters_exact(clients, db, users)


async def test_follow_storm_keeps_every_counter_equal_to_its_edges(clients: Clients, db: asyncpg.Connection) -> None:
    rng = random.Random(20261122)
    users = [f"user{i}" for i in range(12)]
    tokens = {u: auth(u) for u in users}
    pairs = [(a, b) for a in users for b in users if a != b]
    # Every ordered pair, so every mutual a -> b / b -> a races, plus random extras.
    plan = [(kind, a, b) for a, b in pairs for kind in ("follow", "unfollow", "follow")]
    plan += [(rng.choice(["follow", "unfollow"]), *rng.choice(pairs)) for _ in range(700)]
    rng.shuffle(plan)
    assert len(plan) >= 1000

    def call(kind: str, a: str, b: str) -> Any:
        metadata = SERVICE if rng.random() < 0.3 else tokens[a]
        return (follow if kind == "follow" else unfollow)(clients, a, b, metadata=metadata)

    responses = await asyncio.gather(*(call(*step) for step in plan))

    await assert_counters_exact(clients, db, users)
    graph = await edges(db)
    for user in users:
        listed = flat(await list_pages(clients, "ListFollowers", user, page_size=5))
        assert sorted(listed) == sorted(a for a, b in graph if b == user)
        listed = flat(await list_pages(clients, "ListFollowing", user, page_size=5))
        assert sorted(listed) == sorted(b for a, b in graph if a == user)
    assert_changes_explain_edges(plan, responses, graph)


async def test_celebrity_storm_counts_every_follower_across_shards(clients: Clients, db: asyncpg.Connection) -> None:
    fans = [f"fan{i}" for i in range(1000)]

    responses = await asyncio.gather(*(follow(clients, fan, "celebrity", metadata=SERVICE) for fan in fans))

    assert all(r.changed for r in responses)
    assert await follow_counts(clients, ["celebrity"]) == [pb.FollowCounts(user_id="celebrity", follower_count=1000)]
    assert await db.fetchval("SELECT count(*) FROM follows WHERE followed_id = 'celebrity'") == 1000
    assert await db.fetchval(
        "SELECT count(*) FROM follow_counter_shards WHERE user_id = 'celebrity' AND follower_count > 0"
    ) > 1
    assert await db.fetchval(
        "SELECT sum(follower_count) FROM follow_counter_shards WHERE user_id = 'celebrity'"
    ) == 1000
    assert await follow_counts(clients, fans) == [pb.FollowCounts(user_id=f, following_count=1) for f in fans]
    assert await drift(db) == 0
    listed = flat(await list_pages(clients, "ListFollowers", "celebrity", page_size=300))
    assert sorted(listed) == sorted(fans)


# --- FOLLOWERS visibility of entries ------------------------------------------


async def new_entry(clients: Clients, author: str, privacy: int) -> str:
    request = ipb.CreateEntryRequest(author_id=author, type="post", title="t", privacy=privacy)
    return (await clients.interactions.CreateEntry(request, metadata=auth(author))).entry.entry_id


async def visible_to(clients: Clients, viewer: str, entry_id: str) -> bool:
    """Whether the viewer's own GetEntries (with and without viewer_id) returns the entry; the two must agree."""
    named = await clients.interactions.GetEntries(
        ipb.GetEntriesRequest(entry_ids=[entry_id], viewer_id=viewer), metadata=auth(viewer)
    )
    implied = await clients.interactions.GetEntries(ipb.GetEntriesRequest(entry_ids=[entry_id]), metadata=auth(viewer))
    counted = await clients.interactions.GetInteractionCounts(
        ipb.GetInteractionCountsRequest(entry_ids=[entry_id]), metadata=auth(viewer)
    )
    seen = [e.entry_id for e in named.entries]
    assert [e.entry_id for e in implied.entries] == seen
    assert [c.entry_id for c in counted.counts] == seen
    assert [s.entry_id for s in named.states] == seen
    return seen == [entry_id]


async def resonate(clients: Clients, user: str, entry_id: str) -> ipb.ToggleResonanceResponse:
    request = ipb.ToggleResonanceRequest(user_id=user, entry_id=entry_id)
    return await clients.interactions.ToggleResonance(request, metadata=auth(user))


async def test_followers_entries_are_visible_exactly_while_following(clients: Clients) -> None:
    entry_id = await new_entry(clients, "alice", ipb.PRIVACY_FOLLOWERS)
    await follow(clients, "alice", "bob")  # alice following bob gives bob nothing

    assert await visible_to(clients, "alice", entry_id)
    assert not await visible_to(clients, "bob", entry_id)
    assert (await rpc_error(resonate(clients, "bob", entry_id))).code() == grpc.StatusCode.NOT_FOUND

    await follow(clients, "bob", "alice")

    assert await visible_to(clients, "bob", entry_id)
    resonated = await resonate(clients, "bob", entry_id)
    assert (resonated.resonated, resonated.counts.resonance_count) == (True, 1)
    assert not await visible_to(clients, "carol", entry_id)  # still hidden from non-followers
    assert (await rpc_error(resonate(clients, "carol", entry_id))).code() == grpc.StatusCode.NOT_FOUND

    await unfollow(clients, "bob", "alice")

    assert not await visible_to(clients, "bob", entry_id)
    assert (await rpc_error(resonate(clients, "bob", entry_id))).code() == grpc.StatusCode.NOT_FOUND
    assert await visible_to(clients, "alice", entry_id)


async def test_private_entries_stay_hidden_from_followers(clients: Clients) -> None:
    private_id = await new_entry(clients, "alice", ipb.PRIVACY_PRIVATE)
    public_id = await new_entry(clients, "alice", ipb.PRIVACY_PUBLIC)
    await follow(clients, "bob", "alice")

    assert not await visible_to(clients, "bob", private_id)
    assert (await rpc_error(resonate(clients, "bob", private_id))).code() == grpc.StatusCode.NOT_FOUND
    assert await visible_to(clients, "bob", public_id)
    assert await visible_to(clients, "carol", public_id)
    assert await visible_to(clients, "alice", private_id)


# --- reconcile ------------------------------------------------------------------


async def test_reconcile_finds_and_repairs_drift(clients: Clients, db: asyncpg.Connection) -> None:
    for follower, followed in [("bob", "alice"), ("carol", "alice"), ("alice", "bob")]:
        await follow(clients, follower, followed)
    assert await drift(db) == 0
    shard = await db.fetchval("SELECT counter_shard('bob')")
    # Three kinds of drift: an inflated row, a missing row, a row for edges that do not exist.
    await db.execute(
        "UPDATE follow_counter_shards SET follower_count = follower_count + 1 WHERE user_id = 'alice' AND shard = $1", shard
    )
    await db.execute("DELETE FROM follow_counter_shards WHERE user_id = 'carol'")
    await db.execute("INSERT INTO follow_counter_shards (user_id, shard, following_count) VALUES ('ghost', 5, 4)")
    assert (await follow_counts(clients, ["alice"]))[0].follower_count == 3  # the drift is served

    found = await db.fetch("SELECT * FROM reconcile_follow_counters(false) ORDER BY user_id, counter")

    assert [tuple(r) for r in found] == [
        ("alice", shard, "follower_count", 2, 1),
        ("carol", await db.fetchval("SELECT counter_shard('alice')"), "following_count", 0, 1),
        ("ghost", 5, "following_count", 4, 0),
    ]
    assert await drift(db) == 3  # reporting repairs nothing

    repaired = await db.fetch("SELECT * FROM reconcile_follow_counters(true) ORDER BY user_id, counter")

    assert repaired == found
    assert await drift(db) == 0
    await assert_counters_exact(clients, db, ["alice", "bob", "carol", "ghost"])
    assert await follow_counts(clients, ["alice", "carol", "ghost"]) == [
        pb.FollowCounts(user_id="alice", follower_count=2, following_count=1),
        pb.FollowCounts(user_id="carol", following_count=1),
        pb.FollowCounts(user_id="ghost"),
    ]


async def run_nexus(*args: str, database_url: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_DATABASE_URL=database_url, NEXUS_JWT_SECRET=JWT_SECRET)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus.cli", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode()


async def test_nexus_reconcile_command_reports_then_fixes_follow_drift(
    clients: Clients, db: asyncpg.Connection, db_url: str
) -> None:
    await follow(clients, "bob", "alice")
    await db.execute(
        "UPDATE follow_counter_shards SET follower_count = follower_count + 1"
        " WHERE user_id = 'alice' AND shard = counter_shard('bob')"
    )

    code, output = await run_nexus("reconcile", database_url=db_url)
    assert code == 1, output
    assert "check=follow_counters user_id=alice" in output and "drift found: 1" in output, output
    assert await drift(db) == 1

    code, output = await run_nexus("reconcile", "--fix", database_url=db_url)
    assert code == 0, output
    assert "drift repaired: 1" in output, output

    code, output = await run_nexus("reconcile", database_url=db_url)
    assert (code, output.strip().splitlines()[-1]) == (0, "drift found: 0 counter(s)"), output
    assert await follow_counts(clients, ["alice"]) == [pb.FollowCounts(user_id="alice", follower_count=1)]
