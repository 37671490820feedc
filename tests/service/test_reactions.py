"""Resonance, amplification and shares: toggle / set semantics, counts, states,
resonator lists, and the core promise that every counter equals its rows
under concurrent racing clients."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from nexus.v1 import interaction_pb2 as pb

from support.rpc import SERVICE, Clients, all_pages, auth, bad_request_fields, new_uuid, rpc_error

pytestmark = pytest.mark.cluster


@dataclass(frozen=True)
class Reaction:
    """One reaction kind and the names its RPCs and messages use."""

    kind: str  # the database reaction_kind
    toggle_rpc: str
    toggle_request: type
    set_rpc: str
    set_request: type
    state: str  # response / request field: resonated, amplified
    count: str  # InteractionCounts field


RESONANCE = Reaction(
    "resonance", "ToggleResonance", pb.ToggleResonanceRequest, "SetResonance", pb.SetResonanceRequest,
    "resonated", "resonance_count",
)
AMPLIFICATION = Reaction(
    "amplification", "ToggleAmplification", pb.ToggleAmplificationRequest, "SetAmplification",
    pb.SetAmplificationRequest, "amplified", "amplification_count",
)
REACTIONS = [pytest.param(RESONANCE, id="resonance"), pytest.param(AMPLIFICATION, id="amplification")]


def caller(user: str, as_service: bool) -> Any:
    return SERVICE if as_service else auth(user)


async def toggle(
    clients: Clients, reaction: Reaction, user: str, entry_id: str, as_service: bool = False
) -> tuple[bool, pb.InteractionCounts]:
    rpc = getattr(clients.interactions, reaction.toggle_rpc)
    response = await rpc(reaction.toggle_request(user_id=user, entry_id=entry_id), metadata=caller(user, as_service))
    return getattr(response, reaction.state), response.counts


async def set_reaction(
    clients: Clients, reaction: Reaction, user: str, entry_id: str, on: bool, as_service: bool = False
) -> tuple[bool, bool, pb.InteractionCounts]:
    rpc = getattr(clients.interactions, reaction.set_rpc)
    request = reaction.set_request(user_id=user, entry_id=entry_id, **{reaction.state: on})
    response = await rpc(request, metadata=caller(user, as_service))
    return getattr(response, reaction.state), response.changed, response.counts


async def share(
    clients: Clients, user: str, entry_id: str, request_id: str, as_service: bool = False
) -> pb.RecordShareResponse:
    request = pb.RecordShareRequest(user_id=user, entry_id=entry_id, request_id=request_id)
    return await clients.interactions.RecordShare(request, metadata=caller(user, as_service))


async def new_entry(clients: Clients, author: str = "alice", privacy: int = pb.PRIVACY_PUBLIC) -> str:
    request = pb.CreateEntryRequest(author_id=author, type="post", privacy=privacy)
    return (await clients.interactions.CreateEntry(request, metadata=auth(author))).entry.entry_id


async def counts(clients: Clients, entry_ids: list[str], metadata: Any = SERVICE) -> list[pb.InteractionCounts]:
    request = pb.GetInteractionCountsRequest(entry_ids=entry_ids)
    return list((await clients.interactions.GetInteractionCounts(request, metadata=metadata)).counts)


async def counts_of(clients: Clients, entry_id: str) -> pb.InteractionCounts:
    (result,) = await counts(clients, [entry_id])
    return result


async def states(clients: Clients, user: str, entry_ids: list[str], metadata: Any = None) -> list[pb.UserInteractionState]:
    request = pb.GetUserInteractionStatesRequest(user_id=user, entry_ids=entry_ids)
    response = await clients.interactions.GetUserInteractionStates(request, metadata=metadata or auth(user))
    return list(response.states)


async def reaction_rows(db: asyncpg.Connection, entry_id: str, kind: str) -> int:
    return await db.fetchval("SELECT count(*) FROM reactions WHERE entry_id = $1 AND kind = $2", entry_id, kind)


async def share_rows(db: asyncpg.Connection, entry_id: str) -> int:
    return await db.fetchval("SELECT count(*) FROM shares WHERE entry_id = $1", entry_id)


async def assert_counters_exact(clients: Clients, db: asyncpg.Connection, entry_ids: list[str]) -> None:
    """Each served counter equals the rows it counts, and reconcile finds no drift."""
    for served in await counts(clients, entry_ids):
        assert served.resonance_count == await reaction_rows(db, served.entry_id, "resonance")
        assert served.amplification_count == await reaction_rows(db, served.entry_id, "amplification")
        assert served.share_count == await share_rows(db, served.entry_id)
    assert await db.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)") == 0


# Toggle and Set


@pytest.mark.parametrize("reaction", REACTIONS)
async def test_toggle_flips_the_state_and_the_count(clients: Clients, db: asyncpg.Connection, reaction: Reaction) -> None:
    entry_id = await new_entry(clients)

    on, on_counts = await toggle(clients, reaction, "bob", entry_id)
    off, off_counts = await toggle(clients, reaction, "bob", entry_id)

    assert (on, getattr(on_counts, reaction.count)) == (True, 1)
    assert (off, getattr(off_counts, reaction.count)) == (False, 0)
    assert on_counts.entry_id == entry_id
    other = AMPLIFICATION if reaction is RESONANCE else RESONANCE
    assert getattr(on_counts, other.count) == 0
    await assert_counters_exact(clients, db, [entry_id])


@pytest.mark.parametrize("reaction", REACTIONS)
async def test_set_is_idempotent_and_reports_changed(clients: Clients, db: asyncpg.Connection, reaction: Reaction) -> None:
    entry_id = await new_entry(clients)
    outcomes = []
    for on in (True, True, False, False, True):
        state, changed, result = await set_reaction(clients, reaction, "bob", entry_id, on)
        outcomes.append((state, changed, getattr(result, reaction.count)))

    assert outcomes == [(True, True, 1), (True, False, 1), (False, True, 0), (False, False, 0), (True, True, 1)]
    await assert_counters_exact(clients, db, [entry_id])


@pytest.mark.parametrize("reaction", REACTIONS)
async def test_set_and_toggle_act_on_the_same_state(clients: Clients, reaction: Reaction) -> None:
    entry_id = await new_entry(clients)
    await set_reaction(clients, reaction, "bob", entry_id, True)

    state, _ = await toggle(clients, reaction, "bob", entry_id)
    _, changed, _ = await set_reaction(clients, reaction, "bob", entry_id, False)

    assert (state, changed) == (False, False)


async def test_counts_add_up_over_users_and_kinds(clients: Clients, db: asyncpg.Connection) -> None:
    entry_id = await new_entry(clients)
    for user in ("bob", "carol", "dave"):
        await toggle(clients, RESONANCE, user, entry_id)
    await toggle(clients, AMPLIFICATION, "carol", entry_id)
    await share(clients, "dave", entry_id, "share-1")

    assert await counts_of(clients, entry_id) == pb.InteractionCounts(
        entry_id=entry_id, resonance_count=3, amplification_count=1, share_count=1
    )
    await assert_counters_exact(clients, db, [entry_id])


@pytest.mark.parametrize("reaction", REACTIONS)
async def test_reacting_to_unknown_or_hidden_entry_is_not_found(clients: Clients, reaction: Reaction) -> None:
    private_id = await new_entry(clients, author="alice", privacy=pb.PRIVACY_PRIVATE)

    for entry_id in (new_uuid(), private_id):
        assert (await rpc_error(toggle(clients, reaction, "bob", entry_id))).code() == grpc.StatusCode.NOT_FOUND
        error = await rpc_error(set_reaction(clients, reaction, "bob", entry_id, True))
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_reacting_to_a_deleted_entry_is_not_found(clients: Clients) -> None:
    entry_id = await new_entry(clients)
    await clients.interactions.DeleteEntry(pb.DeleteEntryRequest(user_id="alice", entry_id=entry_id), metadata=auth("alice"))
    assert (await rpc_error(toggle(clients, RESONANCE, "bob", entry_id))).code() == grpc.StatusCode.NOT_FOUND


async def test_reacting_as_someone_else_is_permission_denied(clients: Clients, db: asyncpg.Connection) -> None:
    entry_id = await new_entry(clients)
    request = pb.ToggleResonanceRequest(user_id="bob", entry_id=entry_id)

    error = await rpc_error(clients.interactions.ToggleResonance(request, metadata=auth("mallory")))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await reaction_rows(db, entry_id, "resonance") == 0


async def test_reacting_with_a_bad_entry_id_is_invalid_argument(clients: Clients) -> None:
    error = await rpc_error(toggle(clients, RESONANCE, "bob", "not-a-uuid"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["entry_id"]


# RecordShare


async def test_record_share_counts_each_request_id_once(clients: Clients, db: asyncpg.Connection) -> None:
    entry_id = await new_entry(clients)

    calls = [("bob", "s1"), ("bob", "s1"), ("bob", "s2"), ("carol", "s1"), ("bob", "s2")]
    outcomes = [(r.recorded, r.counts.share_count) for r in [await share(clients, u, entry_id, rid) for u, rid in calls]]

    assert outcomes == [(True, 1), (False, 1), (True, 2), (True, 3), (False, 3)]
    assert await share_rows(db, entry_id) == 3
    await assert_counters_exact(clients, db, [entry_id])


async def test_record_share_request_id_reused_for_another_entry_is_already_exists(
    clients: Clients, db: asyncpg.Connection
) -> None:
    first, second = await new_entry(clients), await new_entry(clients)
    await share(clients, "bob", first, "s1")

    error = await rpc_error(share(clients, "bob", second, "s1"))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert [c.share_count for c in await counts(clients, [first, second])] == [1, 0]
    await assert_counters_exact(clients, db, [first, second])


async def test_record_share_requires_a_request_id(clients: Clients, db: asyncpg.Connection) -> None:
    entry_id = await new_entry(clients)
    error = await rpc_error(share(clients, "bob", entry_id, ""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["request_id"]
    assert await share_rows(db, entry_id) == 0


async def test_concurrent_retries_of_one_share_count_once(clients: Clients, db: asyncpg.Connection) -> None:
    entry_id = await new_entry(clients)

    responses = await asyncio.gather(*(share(clients, "bob", entry_id, "s1") for _ in range(20)))

    assert sorted(r.recorded for r in responses) == [False] * 19 + [True]
    assert (await counts_of(clients, entry_id)).share_count == 1
    await assert_counters_exact(clients, db, [entry_id])


# GetInteractionCounts and GetUserInteractionStates


async def test_interaction_counts_follow_the_order_asked_and_hide_what_the_caller_may_not_see(
    clients: Clients,
) -> None:
    liked, amplified = await new_entry(clients), await new_entry(clients)
    private = await new_entry(clients, privacy=pb.PRIVACY_PRIVATE)
    for user in ("bob", "carol"):
        await toggle(clients, RESONANCE, user, liked)
    await toggle(clients, AMPLIFICATION, "bob", amplified)
    await toggle(clients, RESONANCE, "alice", private)
    asked = [amplified, new_uuid(), private, liked]

    as_bob = await counts(clients, asked, metadata=auth("bob"))
    as_alice = await counts(clients, asked, metadata=auth("alice"))
    as_service = await counts(clients, asked)

    assert as_bob == [
        pb.InteractionCounts(entry_id=amplified, amplification_count=1),
        pb.InteractionCounts(entry_id=liked, resonance_count=2),
    ]
    assert as_alice == as_service
    assert [c.entry_id for c in as_service] == [amplified, private, liked]
    assert as_service[1] == pb.InteractionCounts(entry_id=private, resonance_count=1)


async def test_user_interaction_states_in_the_order_asked(clients: Clients) -> None:
    liked, amplified, both, untouched = [await new_entry(clients) for _ in range(4)]
    hidden = await new_entry(clients, author="carol", privacy=pb.PRIVACY_PRIVATE)
    await toggle(clients, RESONANCE, "bob", liked)
    await toggle(clients, AMPLIFICATION, "bob", amplified)
    await toggle(clients, RESONANCE, "bob", both)
    await toggle(clients, AMPLIFICATION, "bob", both)

    result = await states(clients, "bob", [untouched, both, new_uuid(), hidden, amplified, liked])

    assert result == [
        pb.UserInteractionState(entry_id=untouched),
        pb.UserInteractionState(entry_id=both, has_resonated=True, has_amplified=True),
        pb.UserInteractionState(entry_id=amplified, has_amplified=True),
        pb.UserInteractionState(entry_id=liked, has_resonated=True),
    ]
    assert await states(clients, "bob", [liked], metadata=SERVICE) == result[-1:]


async def test_user_interaction_states_of_someone_else_are_permission_denied(clients: Clients) -> None:
    entry_id = await new_entry(clients)
    error = await rpc_error(states(clients, "bob", [entry_id], metadata=auth("carol")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# ListResonators


async def resonator_pages(clients: Clients, entry_id: str, page_size: int, metadata: Any = SERVICE) -> list[list[str]]:
    def fetch(token: str) -> Awaitable[pb.ListResonatorsResponse]:
        request = pb.ListResonatorsRequest(entry_id=entry_id, page_size=page_size, page_token=token)
        return clients.interactions.ListResonators(request, metadata=metadata)

    return await all_pages(fetch, lambda page: page.user_ids)


async def test_list_resonators_newest_first_across_pages(clients: Clients) -> None:
    entry_id = await new_entry(clients)
    users = [f"user{i}" for i in range(7)]
    for user in users:
        await toggle(clients, RESONANCE, user, entry_id)

    pages = await resonator_pages(clients, entry_id, page_size=3)

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [u for page in pages for u in page] == users[::-1]


async def test_list_resonators_drops_users_who_took_it_back(clients: Clients) -> None:
    entry_id = await new_entry(clients)
    for user in ("bob", "carol", "dave"):
        await toggle(clients, RESONANCE, user, entry_id)
    await toggle(clients, RESONANCE, "carol", entry_id)
    await toggle(clients, AMPLIFICATION, "erin", entry_id)

    assert await resonator_pages(clients, entry_id, page_size=50) == [["dave", "bob"]]


async def test_list_resonators_pages_have_no_duplicates_or_gaps_after_concurrent_likes(clients: Clients) -> None:
    entry_id = await new_entry(clients)
    users = {f"user{i}" for i in range(40)}
    await asyncio.gather(*(toggle(clients, RESONANCE, user, entry_id, as_service=True) for user in users))

    listed = [u for page in await resonator_pages(clients, entry_id, page_size=3) for u in page]

    assert len(listed) == len(users)
    assert set(listed) == users


async def test_list_resonators_pages_exactly_through_reactions_of_one_instant(
    clients: Clients, db: asyncpg.Connection
) -> None:
    entry_id = await new_entry(clients)
    users = {f"user{i}" for i in range(7)}
    # Written in one statement, so all share one create_time: a tie the page token must break.
    await db.execute(
        "INSERT INTO reactions (user_id, entry_id, kind) SELECT u, $1, 'resonance' FROM unnest($2::text[]) u",
        entry_id,
        list(users),
    )

    listed = [u for page in await resonator_pages(clients, entry_id, page_size=3) for u in page]

    assert len(listed) == len(users)
    assert set(listed) == users


async def test_list_resonators_of_a_hidden_entry_is_not_found(clients: Clients) -> None:
    entry_id = await new_entry(clients, privacy=pb.PRIVACY_PRIVATE)
    error = await rpc_error(resonator_pages(clients, entry_id, page_size=10, metadata=auth("bob")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_list_resonators_rejects_a_garbage_page_token(clients: Clients) -> None:
    entry_id = await new_entry(clients)
    request = pb.ListResonatorsRequest(entry_id=entry_id, page_token="garbage")
    error = await rpc_error(clients.interactions.ListResonators(request, metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_token"]


# Concurrency: racing clients over one channel


@pytest.mark.parametrize("toggles", [200, 201])
@pytest.mark.parametrize("reaction", REACTIONS)
async def test_concurrent_toggles_by_one_user_are_linearizable(
    clients: Clients, db: asyncpg.Connection, reaction: Reaction, toggles: int
) -> None:
    entry_id = await new_entry(clients)

    results = await asyncio.gather(*(toggle(clients, reaction, "bob", entry_id) for _ in range(toggles)))

    # A linearizable history starting "off" alternates on, off, on ...
    final = toggles % 2 == 1
    assert Counter(state for state, _ in results) == Counter({True: (toggles + 1) // 2, False: toggles // 2})
    # bob is the only reactor: each call's counts must agree with its own state.
    assert all(getattr(result, reaction.count) == int(state) for state, result in results)
    (state,) = await states(clients, "bob", [entry_id])
    assert getattr(state, f"has_{reaction.state}") is final
    assert getattr(await counts_of(clients, entry_id), reaction.count) == int(final)
    assert await reaction_rows(db, entry_id, reaction.kind) == int(final)
    await assert_counters_exact(clients, db, [entry_id])


async def test_concurrent_toggles_by_many_users_count_every_one(clients: Clients, db: asyncpg.Connection) -> None:
    users = 1000
    entry_id = await new_entry(clients)

    results = await asyncio.gather(
        *(toggle(clients, RESONANCE, f"user{i}", entry_id, as_service=True) for i in range(users))
    )

    assert all(state for state, _ in results)
    assert all(1 <= result.resonance_count <= users for _, result in results)
    assert (await counts_of(clients, entry_id)).resonance_count == users
    assert await reaction_rows(db, entry_id, "resonance") == users
    await assert_counters_exact(clients, db, [entry_id])


async def test_mixed_storm_keeps_every_counter_equal_to_its_rows(clients: Clients, db: asyncpg.Connection) -> None:
    rng = random.Random(20261121)
    entries = [await new_entry(clients) for _ in range(3)]
    users = [f"user{i}" for i in range(6)]
    shared: dict[str, set[tuple[str, str]]] = {e: set() for e in entries}

    def random_call() -> Any:
        user, entry_index = rng.choice(users), rng.randrange(len(entries))
        entry_id = entries[entry_index]
        reaction = rng.choice([RESONANCE, AMPLIFICATION])
        roll = rng.random()
        if roll < 0.4:
            return toggle(clients, reaction, user, entry_id, as_service=True)
        if roll < 0.8:
            return set_reaction(clients, reaction, user, entry_id, rng.random() < 0.5, as_service=True)
        request_id = f"e{entry_index}-s{rng.randrange(4)}"  # a per-entry namespace, so retries repeat
        shared[entry_id].add((user, request_id))
        return share(clients, user, entry_id, request_id, as_service=True)

    await asyncio.gather(*(random_call() for _ in range(800)))

    await assert_counters_exact(clients, db, entries)
    assert [c.share_count for c in await counts(clients, entries)] == [len(shared[e]) for e in entries]
    for user in users:
        rows = await db.fetch("SELECT entry_id::text, kind::text FROM reactions WHERE user_id = $1", user)
        on = {(r["entry_id"], r["kind"]) for r in rows}
        assert await states(clients, user, entries, metadata=SERVICE) == [
            pb.UserInteractionState(
                entry_id=e, has_resonated=(e, "resonance") in on, has_amplified=(e, "amplification") in on
            )
            for e in entries
        ]
