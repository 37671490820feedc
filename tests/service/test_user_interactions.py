"""Per-user interaction states (saved / applied / ignored ...): RecordInteraction
as an atomic last-write-wins upsert, and ListInteractions."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest

from nexus.pagination import PageTokens
from nexus.v1 import interaction_pb2 as pb

from support.rpc import JWT_SECRET, SERVICE, Clients, auth, bad_request_fields, rpc_error


async def record(
    clients: Clients, target: str, action: str, notes: str = "", user: str = "alice", metadata: Any = None
) -> pb.RecordInteractionResponse:
    request = pb.RecordInteractionRequest(user_id=user, target_id=target, action=action, notes=notes)
    return await clients.interactions.RecordInteraction(request, metadata=metadata or auth(user))


async def list_page(
    clients: Clients, user: str = "alice", metadata: Any = None, **fields: Any
) -> pb.ListInteractionsResponse:
    request = pb.ListInteractionsRequest(user_id=user, **fields)
    return await clients.interactions.ListInteractions(request, metadata=metadata or auth(user))


async def list_all(clients: Clients, page_size: int, **fields: Any) -> list[list[pb.Interaction]]:
    """Every page of a listing, following next_page_token to the end."""
    pages, token = [], ""
    while True:
        page = await list_page(clients, page_size=page_size, page_token=token, **fields)
        pages.append(list(page.interactions))
        token = page.next_page_token
        if not token:
            return pages


def targets(interactions: list[pb.Interaction]) -> list[str]:
    return [i.target_id for i in interactions]


def micros(interaction: pb.Interaction) -> int:
    return interaction.update_time.ToMicroseconds()


async def interaction_rows(db: asyncpg.Connection, user: str, target: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT action, notes FROM user_interactions WHERE user_id = $1 AND target_id = $2", user, target
    )
    return [tuple(r) for r in rows]


# RecordInteraction


async def test_record_interaction_creates_then_replaces(clients: Clients, db: asyncpg.Connection) -> None:
    first = await record(clients, "grant:42", "saved", "looks promising")
    second = await record(clients, "grant:42", "applied", "sent on Monday")

    assert first.created is True
    assert second.created is False
    assert (first.interaction.action, first.interaction.notes) == ("saved", "looks promising")
    assert (second.interaction.user_id, second.interaction.target_id) == ("alice", "grant:42")
    assert (second.interaction.action, second.interaction.notes) == ("applied", "sent on Monday")
    assert second.interaction.create_time == first.interaction.create_time
    assert micros(second.interaction) > micros(first.interaction)
    assert await interaction_rows(db, "alice", "grant:42") == [("applied", "sent on Monday")]
    assert list((await list_page(clients)).interactions) == [second.interaction]


async def test_record_interaction_is_per_user(clients: Clients, db: asyncpg.Connection) -> None:
    await record(clients, "grant:42", "saved", user="alice")
    bob = await record(clients, "grant:42", "ignored", user="bob")

    assert bob.created is True
    assert await interaction_rows(db, "alice", "grant:42") == [("saved", "")]
    assert await interaction_rows(db, "bob", "grant:42") == [("ignored", "")]


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        (dict(target="grant:42", action="Saved"), "action"),
        (dict(target="grant:42", action=""), "action"),
        (dict(target="has space", action="saved"), "target_id"),
        (dict(target="grant:42", action="saved", notes="x" * 2001), "notes"),
    ],
)
async def test_record_interaction_rejects_bad_input_and_writes_nothing(
    clients: Clients, db: asyncpg.Connection, fields: dict[str, Any], bad_field: str
) -> None:
    error = await rpc_error(record(clients, **fields))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [bad_field]
    assert await db.fetchval("SELECT count(*) FROM user_interactions") == 0


async def test_record_interaction_as_someone_else_is_permission_denied(clients: Clients, db: asyncpg.Connection) -> None:
    error = await rpc_error(record(clients, "grant:42", "saved", user="alice", metadata=auth("bob")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await db.fetchval("SELECT count(*) FROM user_interactions") == 0


# ListInteractions


async def record_in_order(clients: Clients, actions: list[str]) -> list[str]:
    """Records target0, target1 ... one after another; returns the target ids."""
    ids = [f"target{i}" for i in range(len(actions))]
    for target, action in zip(ids, actions, strict=True):
        await record(clients, target, action)
    return ids


async def test_list_interactions_most_recently_updated_first(clients: Clients) -> None:
    ids = await record_in_order(clients, ["saved"] * 4)
    await record(clients, ids[1], "applied")

    listed = list((await list_page(clients)).interactions)

    assert targets(listed) == [ids[1], ids[3], ids[2], ids[0]]
    assert [micros(i) for i in listed] == sorted((micros(i) for i in listed), reverse=True)


async def test_list_interactions_filters_by_action(clients: Clients) -> None:
    actions = ["saved", "applied", "saved", "ignored", "saved", "applied"]
    ids = await record_in_order(clients, actions)

    for action in set(actions):
        listed = (await list_page(clients, action=action)).interactions
        expected = [t for t, a in zip(ids, actions, strict=True) if a == action][::-1]
        assert targets(listed) == expected
        assert {i.action for i in listed} == {action}


async def test_list_interactions_is_only_the_callers(clients: Clients) -> None:
    await record(clients, "grant:1", "saved", user="bob")
    assert list((await list_page(clients)).interactions) == []
    error = await rpc_error(list_page(clients, user="bob", metadata=auth("alice")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("page_size", "action"), [(3, ""), (1, ""), (2, "saved")])
async def test_list_interactions_pages_concatenate_to_the_full_listing(
    clients: Clients, page_size: int, action: str
) -> None:
    await record_in_order(clients, ["saved", "applied"] * 4)
    full = list((await list_page(clients, page_size=1000, action=action)).interactions)

    pages = await list_all(clients, page_size, action=action)

    assert [i for page in pages for i in page] == full
    assert all(0 < len(page) <= page_size for page in pages)


async def test_list_interactions_pages_after_concurrent_writes(clients: Clients) -> None:
    ids = {f"target{i}" for i in range(40)}
    await asyncio.gather(*(record(clients, target, "saved") for target in ids))

    listed = [i for page in await list_all(clients, page_size=3) for i in page]

    assert sorted(targets(listed)) == sorted(ids)
    keys = [(micros(i), i.target_id) for i in listed]
    assert keys == sorted(keys, reverse=True)


async def test_list_interactions_pages_exactly_through_updates_of_one_instant(
    clients: Clients, db: asyncpg.Connection
) -> None:
    ids = {f"target{i}" for i in range(7)}
    # Written in one statement, so all share one update_time: a tie the page token must break.
    await db.execute(
        "INSERT INTO user_interactions (user_id, target_id, action, notes)"
        " SELECT 'alice', t, 'saved', '' FROM unnest($1::text[]) t",
        list(ids),
    )

    listed = targets([i for page in await list_all(clients, page_size=3) for i in page])

    assert sorted(listed) == sorted(ids)


async def test_list_interactions_rejects_a_page_token_of_another_filter(clients: Clients) -> None:
    await record_in_order(clients, ["saved"] * 3)
    token = (await list_page(clients, page_size=1)).next_page_token

    error = await rpc_error(list_page(clients, action="saved", page_token=token))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_token"]


# Concurrency


async def test_concurrent_records_on_one_target_leave_exactly_one_row(clients: Clients, db: asyncpg.Connection) -> None:
    writes = [(action, f"note {i}") for i, action in enumerate(["saved", "applied", "ignored", "archived", "starred"] * 10)]

    responses = await asyncio.gather(
        *(record(clients, "grant:42", action, notes, metadata=SERVICE) for action, notes in writes)
    )

    assert sorted(r.created for r in responses) == [False] * (len(writes) - 1) + [True]
    rows = await interaction_rows(db, "alice", "grant:42")
    assert len(rows) == 1 and rows[0] in writes
    (listed,) = (await list_page(clients)).interactions
    assert (listed.action, listed.notes) == rows[0]
    # Last write wins: the surviving row is the write with the latest update_time.
    latest = max(micros(r.interaction) for r in responses)
    assert micros(listed) == latest
    assert rows[0] in {(r.interaction.action, r.interaction.notes) for r in responses if micros(r.interaction) == latest}


@pytest.mark.parametrize("position", [[1], [10**20, "x"], ["soon", "x"], [1, 2]])
async def test_a_signed_token_with_a_malformed_position_is_invalid(clients: Clients, position: list[object]) -> None:
    token = PageTokens(JWT_SECRET.encode()).encode("interactions:alice:", position)
    error = await rpc_error(
        clients.interactions.ListInteractions(pb.ListInteractionsRequest(user_id="alice", page_token=token), metadata=SERVICE)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_token"]
