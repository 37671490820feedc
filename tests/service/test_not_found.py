""""Not found" is one of the service's SQLSTATEs (NX404) raised or returned by
the database, like every other error, and reaches the caller as NOT_FOUND with
a ResourceInfo naming the request field. In a group-commit batch it is the
outcome of its item alone: the other items of the batch apply."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
from google.rpc import error_details_pb2

from nexus.v1 import follow_pb2, memory_pb2
from nexus.v1 import interaction_pb2 as pb

from support.rpc import SERVICE, Clients, auth, error_details, new_uuid, rpc_error


def resource_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ResourceInfo:
    """The ResourceInfo detail of a NOT_FOUND error."""
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    (info,) = error_details(error, error_details_pb2.ResourceInfo)
    return info


async def test_get_of_an_unknown_memory_names_the_memory_id(clients: Clients) -> None:
    request = memory_pb2.GetMemoryRequest(user_id="alice", memory_id=new_uuid())
    info = resource_info(await rpc_error(clients.memories.GetMemory(request, metadata=auth("alice"))))
    assert (info.resource_name, info.description) == ("memory_id", "memory not found")


async def test_a_reaction_to_an_unknown_entry_names_the_entry_id(clients: Clients) -> None:
    entry_id = new_uuid()
    request = pb.ToggleResonanceRequest(user_id="bob", entry_id=entry_id)
    info = resource_info(await rpc_error(clients.interactions.ToggleResonance(request, metadata=auth("bob"))))
    assert (info.resource_name, info.description) == ("entry_id", f"entry {entry_id} not found")


async def test_in_one_storm_only_the_users_who_may_not_see_the_entry_get_not_found(
    clients: Clients, db: asyncpg.Connection
) -> None:
    """Concurrent toggles on one followers-only entry go out in shared batches; the
    strangers' items are NOT_FOUND and the followers' all apply."""
    request = pb.CreateEntryRequest(author_id="alice", type="post", privacy=pb.PRIVACY_FOLLOWERS)
    entry_id = (await clients.interactions.CreateEntry(request, metadata=auth("alice"))).entry.entry_id
    followers = [f"follower-{i}" for i in range(20)]
    strangers = [f"stranger-{i}" for i in range(20)]
    for user in followers:
        await clients.follows.Follow(follow_pb2.FollowRequest(follower_id=user, followed_id="alice"), metadata=auth(user))

    async def toggle(user: str) -> pb.ToggleResonanceResponse:
        toggle_request = pb.ToggleResonanceRequest(user_id=user, entry_id=entry_id)
        return await clients.interactions.ToggleResonance(toggle_request, metadata=auth(user))

    interleaved = [user for pair in zip(followers, strangers, strict=True) for user in pair]
    outcomes = dict(zip(interleaved, await asyncio.gather(*map(toggle, interleaved), return_exceptions=True), strict=True))

    for user in followers:
        assert isinstance(outcomes[user], pb.ToggleResonanceResponse), outcomes[user]
        assert outcomes[user].resonated
    for user in strangers:
        error = outcomes[user]
        assert isinstance(error, grpc.aio.AioRpcError), error
        assert resource_info(error).resource_name == "entry_id"
    counts = await clients.interactions.GetInteractionCounts(
        pb.GetInteractionCountsRequest(entry_ids=[entry_id]), metadata=SERVICE
    )
    assert counts.counts[0].resonance_count == len(followers)
    reactors = await db.fetch("SELECT user_id FROM reactions WHERE entry_id = $1", entry_id)
    assert sorted(r["user_id"] for r in reactors) == sorted(followers)
