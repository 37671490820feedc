"""Entries and their branch trees: CreateEntry, CreateBranch, GetBranchTree,
GetEntries and DeleteEntry, including retries and concurrent branching."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from nexus.pagination import scope_key
from nexus.v1 import follow_pb2 as fpb
from nexus.v1 import interaction_pb2 as pb

from support.rpc import SERVICE, Clients, all_pages, auth, bad_request_fields, new_uuid, rpc_error

# The cluster pass of CI keeps the tests whose work the cluster spreads over
# workers (marked cluster): request claims and branches in two-phase commits,
# privacy read from the viewer's worker, trees read from every worker. The
# release check runs them all.


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


async def create_entry(clients: Clients, author: str = "alice", **fields: Any) -> pb.Entry:
    fields.setdefault("type", "post")
    request = pb.CreateEntryRequest(author_id=author, **fields)
    return (await clients.interactions.CreateEntry(request, metadata=auth(author))).entry


async def create_branch(clients: Clients, parent_id: str, author: str = "alice", **fields: Any) -> pb.Entry:
    fields.setdefault("type", "reply")
    request = pb.CreateBranchRequest(author_id=author, parent_entry_id=parent_id, **fields)
    return (await clients.interactions.CreateBranch(request, metadata=auth(author))).entry


async def delete_entry(clients: Clients, entry_id: str, user: str = "alice", metadata: Any = None) -> None:
    request = pb.DeleteEntryRequest(user_id=user, entry_id=entry_id)
    await clients.interactions.DeleteEntry(request, metadata=metadata or auth(user))


async def get_entries(
    clients: Clients, entry_ids: list[str], metadata: Any = SERVICE, viewer_id: str = ""
) -> pb.GetEntriesResponse:
    request = pb.GetEntriesRequest(entry_ids=entry_ids, viewer_id=viewer_id)
    return await clients.interactions.GetEntries(request, metadata=metadata)


async def branch_count(clients: Clients, entry_id: str) -> int:
    (entry,) = (await get_entries(clients, [entry_id])).entries
    return entry.counts.branch_count


async def tree_page(clients: Clients, root_id: str, **fields: Any) -> pb.GetBranchTreeResponse:
    request = pb.GetBranchTreeRequest(root_entry_id=root_id, **fields)
    return await clients.interactions.GetBranchTree(request, metadata=SERVICE)


async def tree_pages(clients: Clients, root_id: str, page_size: int, **fields: Any) -> list[list[pb.BranchNode]]:
    """Every page of a tree listing, following next_page_token to the end."""
    return await all_pages(
        lambda token: tree_page(clients, root_id, page_size=page_size, page_token=token, **fields), lambda page: page.nodes
    )


async def children_rows(db: asyncpg.Connection, parent_id: str) -> list[int]:
    rows = await db.fetch("SELECT branch_order FROM entries WHERE parent_entry_id = $1 ORDER BY branch_order", parent_id)
    return [r["branch_order"] for r in rows]


async def counter_drift(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM reconcile_entry_counters(false)")


# The tree below, created in this (interleaved) order so that pre-order is not
# creation order:
#   root
#   ├── a          (branch_order 0)
#   │   ├── a0
#   │   └── a1
#   ├── b          (1)
#   │   └── b0
#   │       └── b00
#   └── c          (2)
TREE_CREATION_ORDER = [("a", "root"), ("b", "root"), ("a0", "a"), ("b0", "b"), ("c", "root"), ("a1", "a"), ("b00", "b0")]
PRE_ORDER = ["root", "a", "a0", "a1", "b", "b0", "b00", "c"]


async def build_tree(clients: Clients) -> dict[str, pb.Entry]:
    """The tree above, by name."""
    entries = {"root": await create_entry(clients, title="root")}
    for name, parent in TREE_CREATION_ORDER:
        entries[name] = await create_branch(clients, entries[parent].entry_id, title=name)
    return entries


def expected_node(entry: pb.Entry) -> pb.BranchNode:
    return pb.BranchNode(
        entry_id=entry.entry_id,
        parent_entry_id=entry.parent_entry_id,
        depth=entry.depth,
        branch_order=entry.branch_order,
    )


def expected_nodes(entries: dict[str, pb.Entry], names: list[str]) -> list[pb.BranchNode]:
    return [expected_node(entries[name]) for name in names]


# CreateEntry


async def test_create_entry_round_trips_every_field(clients: Clients) -> None:
    metadata = struct({"mood": "calm", "score": 3, "nested": {"list": [1, "two", True], "none": None}})
    entry = await create_entry(
        clients, type="logbook", title="Day one", content="It began.", tags=["a", "b", "a", "c", "b"], metadata=metadata
    )

    assert (entry.author_id, entry.type, entry.title, entry.content) == ("alice", "logbook", "Day one", "It began.")
    assert list(entry.tags) == ["a", "b", "c"]
    assert entry.metadata == metadata
    assert entry.privacy == pb.PRIVACY_PUBLIC
    assert (entry.depth, entry.branch_order, entry.parent_entry_id) == (0, 0, "")
    assert entry.root_entry_id == entry.entry_id
    assert entry.counts == pb.InteractionCounts(entry_id=entry.entry_id)
    assert entry.create_time.ToMicroseconds() > 0
    assert entry.update_time == entry.create_time
    assert (await get_entries(clients, [entry.entry_id])).entries == [entry]


async def test_create_entry_keeps_an_explicit_privacy(clients: Clients) -> None:
    entry = await create_entry(clients, privacy=pb.PRIVACY_FOLLOWERS)
    assert entry.privacy == pb.PRIVACY_FOLLOWERS


@pytest.mark.cluster
async def test_create_entry_retry_returns_the_original_and_writes_once(clients: Clients, db: asyncpg.Connection) -> None:
    fields = dict(title="t", content="once", tags=["x"], request_id="req-1")
    first = await create_entry(clients, **fields)
    retry = await create_entry(clients, **fields)

    assert retry == first
    assert await db.fetchval("SELECT count(*) FROM entries WHERE request_id = 'req-1'") == 1


async def test_create_entry_request_id_with_other_content_is_already_exists(
    clients: Clients, db: asyncpg.Connection
) -> None:
    original = await create_entry(clients, content="first", request_id="req-1")

    error = await rpc_error(create_entry(clients, content="second", request_id="req-1"))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    rows = await db.fetch("SELECT entry_id::text, content FROM entries")
    assert [tuple(r) for r in rows] == [(original.entry_id, "first")]


@pytest.mark.cluster
async def test_concurrent_create_entry_with_one_request_id_creates_one_entry(
    clients: Clients, db: asyncpg.Connection
) -> None:
    entries = await asyncio.gather(*(create_entry(clients, content="race", request_id="same") for _ in range(10)))

    assert len({e.entry_id for e in entries}) == 1
    assert await db.fetchval("SELECT count(*) FROM entries") == 1


@pytest.mark.refused_in_python
@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        (dict(type="Not A Word"), "type"),
        (dict(title="x" * 301), "title"),
        (dict(tags=["ok", ""]), "tags[1]"),
        (dict(request_id="has space"), "request_id"),
    ],
)
async def test_create_entry_rejects_bad_input_and_writes_nothing(
    clients: Clients, db: asyncpg.Connection, fields: dict[str, Any], bad_field: str
) -> None:
    error = await rpc_error(create_entry(clients, **fields))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [bad_field]
    assert await db.fetchval("SELECT count(*) FROM entries") == 0


@pytest.mark.refused_in_python
async def test_create_entry_as_someone_else_is_permission_denied(clients: Clients) -> None:
    request = pb.CreateEntryRequest(author_id="alice", type="post")
    error = await rpc_error(clients.interactions.CreateEntry(request, metadata=auth("bob")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# CreateBranch


async def test_branches_are_numbered_in_creation_order(clients: Clients) -> None:
    root = await create_entry(clients)
    children = [await create_branch(clients, root.entry_id, author=author) for author in ("alice", "bob", "carol")]
    grandchild = await create_branch(clients, children[1].entry_id, content="deeper")

    assert [c.branch_order for c in children] == [0, 1, 2]
    assert [c.author_id for c in children] == ["alice", "bob", "carol"]
    for child in children:
        assert (child.depth, child.parent_entry_id, child.root_entry_id) == (1, root.entry_id, root.entry_id)
    assert (grandchild.depth, grandchild.branch_order) == (2, 0)
    assert (grandchild.parent_entry_id, grandchild.root_entry_id) == (children[1].entry_id, root.entry_id)
    assert await branch_count(clients, root.entry_id) == 3
    assert await branch_count(clients, children[1].entry_id) == 1
    assert await branch_count(clients, grandchild.entry_id) == 0


async def test_create_branch_under_unknown_parent_is_not_found(clients: Clients, db: asyncpg.Connection) -> None:
    error = await rpc_error(create_branch(clients, new_uuid()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert await db.fetchval("SELECT count(*) FROM entries") == 0


async def test_create_branch_under_deleted_parent_is_not_found(clients: Clients) -> None:
    parent = await create_entry(clients)
    await delete_entry(clients, parent.entry_id)

    error = await rpc_error(create_branch(clients, parent.entry_id))

    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_create_branch_under_someone_elses_private_entry_is_not_found(clients: Clients) -> None:
    parent = await create_entry(clients, privacy=pb.PRIVACY_PRIVATE)
    error = await rpc_error(create_branch(clients, parent.entry_id, author="bob"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.cluster
async def test_create_branch_retry_returns_the_original_and_counts_once(
    clients: Clients, db: asyncpg.Connection
) -> None:
    parent = await create_entry(clients)
    first = await create_branch(clients, parent.entry_id, content="reply", request_id="reply-1")
    retry = await create_branch(clients, parent.entry_id, content="reply", request_id="reply-1")

    assert retry == first
    assert await children_rows(db, parent.entry_id) == [0]
    assert await branch_count(clients, parent.entry_id) == 1


async def test_create_branch_request_id_with_other_arguments_is_already_exists(
    clients: Clients, db: asyncpg.Connection
) -> None:
    parent, other_parent = await create_entry(clients), await create_entry(clients)
    await create_branch(clients, parent.entry_id, content="reply", request_id="reply-1")

    for attempt in (
        create_branch(clients, parent.entry_id, content="edited", request_id="reply-1"),
        create_branch(clients, other_parent.entry_id, content="reply", request_id="reply-1"),
    ):
        assert (await rpc_error(attempt)).code() == grpc.StatusCode.ALREADY_EXISTS

    assert await children_rows(db, parent.entry_id) == [0]
    assert await children_rows(db, other_parent.entry_id) == []
    assert await counter_drift(db) == 0


@pytest.mark.cluster
async def test_concurrent_retries_of_one_branch_create_it_once(clients: Clients, db: asyncpg.Connection) -> None:
    parent = await create_entry(clients)

    branches = await asyncio.gather(
        *(create_branch(clients, parent.entry_id, content="reply", request_id="reply-1") for _ in range(10))
    )

    assert len({b.entry_id for b in branches}) == 1
    assert await children_rows(db, parent.entry_id) == [0]
    assert await branch_count(clients, parent.entry_id) == 1


@pytest.mark.cluster
async def test_concurrent_branches_get_every_order_exactly_once(clients: Clients, db: asyncpg.Connection) -> None:
    children = 60
    parent = await create_entry(clients)

    async def reply(i: int) -> pb.Entry:
        request = pb.CreateBranchRequest(author_id=f"user{i}", parent_entry_id=parent.entry_id, type="reply")
        return (await clients.interactions.CreateBranch(request, metadata=SERVICE)).entry

    branches = await asyncio.gather(*(reply(i) for i in range(children)))

    assert sorted(b.branch_order for b in branches) == list(range(children))
    assert await children_rows(db, parent.entry_id) == list(range(children))
    assert await branch_count(clients, parent.entry_id) == children
    assert await counter_drift(db) == 0
    by_order = sorted(branches, key=lambda b: b.branch_order)
    nodes = (await tree_page(clients, parent.entry_id, page_size=1000)).nodes
    assert [n.entry_id for n in nodes] == [parent.entry_id, *(b.entry_id for b in by_order)]


# GetBranchTree


async def test_branch_tree_is_depth_first_pre_order(clients: Clients) -> None:
    entries = await build_tree(clients)

    page = await tree_page(clients, entries["root"].entry_id)

    assert list(page.nodes) == expected_nodes(entries, PRE_ORDER)
    assert page.next_page_token == ""


@pytest.mark.parametrize(
    ("top", "max_depth", "names"),
    [
        ("root", 1, ["root", "a", "b", "c"]),
        ("root", 2, ["root", "a", "a0", "a1", "b", "b0", "c"]),
        ("a", 0, ["a", "a0", "a1"]),
        ("b", 0, ["b", "b0", "b00"]),
        ("b", 1, ["b", "b0"]),
        ("b0", 0, ["b0", "b00"]),
        ("c", 0, ["c"]),
        ("a1", 5, ["a1"]),
    ],
)
async def test_branch_tree_of_a_subtree_and_limited_depth(
    clients: Clients, top: str, max_depth: int, names: list[str]
) -> None:
    entries = await build_tree(clients)

    page = await tree_page(clients, entries[top].entry_id, max_depth=max_depth)

    assert list(page.nodes) == expected_nodes(entries, names)


@pytest.mark.parametrize("page_size", [1, 2, 3])
@pytest.mark.cluster
async def test_branch_tree_pages_concatenate_to_the_full_listing(clients: Clients, page_size: int) -> None:
    entries = await build_tree(clients)
    full = list((await tree_page(clients, entries["root"].entry_id, page_size=1000)).nodes)

    pages = await tree_pages(clients, entries["root"].entry_id, page_size)

    assert [node for page in pages for node in page] == full
    assert all(0 < len(page) <= page_size for page in pages)


async def test_branch_tree_pages_of_a_limited_subtree(clients: Clients) -> None:
    entries = await build_tree(clients)
    pages = await tree_pages(clients, entries["b"].entry_id, page_size=1, max_depth=1)
    assert [node for page in pages for node in page] == expected_nodes(entries, ["b", "b0"])


@pytest.mark.refused_in_python
async def test_branch_tree_rejects_a_garbage_page_token(clients: Clients) -> None:
    root = await create_entry(clients)

    error = await rpc_error(tree_page(clients, root.entry_id, page_token="not-a-token"))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_token"]


async def test_branch_tree_rejects_a_page_token_of_another_tree(clients: Clients) -> None:
    entries = await build_tree(clients)
    token = (await tree_page(clients, entries["root"].entry_id, page_size=1)).next_page_token

    error = await rpc_error(tree_page(clients, entries["a"].entry_id, page_token=token))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_token"]


async def test_a_services_page_token_is_not_accepted_for_a_user_named_none(clients: Clients) -> None:
    """A service lists with no viewer; a user whose id is literally "None" must
    not be able to continue that listing (or any other viewer's)."""
    entries = await build_tree(clients)
    root_id = entries["root"].entry_id
    service_token = (await tree_page(clients, root_id, page_size=1)).next_page_token
    as_none = pb.GetBranchTreeRequest(root_entry_id=root_id, page_size=1, page_token=service_token)

    error = await rpc_error(clients.interactions.GetBranchTree(as_none, metadata=auth("None")))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["page_token"]
    own = await clients.interactions.GetBranchTree(
        pb.GetBranchTreeRequest(root_entry_id=root_id, page_size=1), metadata=auth("None")
    )
    continued = pb.GetBranchTreeRequest(root_entry_id=root_id, page_size=1, page_token=own.next_page_token)
    page = await clients.interactions.GetBranchTree(continued, metadata=auth("None"))
    assert [n.entry_id for n in page.nodes] == [entries["a"].entry_id]


TRICKY_SCOPES = [
    ("tree", "e", 0, None), ("tree", "e", 0, "None"), ("tree", "e", 0, ""), ("tree", "e", 0, "\\0"),
    ("patterns", "a", "b:c"), ("patterns", "a:b", "c"), ("patterns", "a\\", ":c"), ("patterns", "a\\:", "c"),
    ("x", "\\"), ("x", "\\\\"), ("x", ":"), ("x", "\\:"), ("x", None, None), ("x", "\\0:\\0"),
]


def test_page_token_scopes_never_share_a_key() -> None:
    keys = [scope_key(scope) for scope in TRICKY_SCOPES]
    assert len(set(keys)) == len(keys), keys
    # Scopes of plain parts keep the key earlier versions wrote: their tokens stay valid.
    assert scope_key(("events", "memory", "alice")) == "events:memory:alice"
    assert scope_key(("tree", "e", 2, "bob")) == "tree:e:2:bob"


@pytest.mark.refused_in_python
async def test_branch_tree_rejects_a_negative_max_depth(clients: Clients) -> None:
    root = await create_entry(clients)
    error = await rpc_error(tree_page(clients, root.entry_id, max_depth=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["max_depth"]


async def test_branch_tree_of_unknown_entry_is_not_found(clients: Clients) -> None:
    error = await rpc_error(tree_page(clients, new_uuid()))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# GetEntries


async def test_get_entries_follows_the_order_asked_and_skips_unknown_ids(clients: Clients) -> None:
    first, second, third = [await create_entry(clients, title=str(i)) for i in range(3)]

    response = await get_entries(clients, [third.entry_id, new_uuid(), first.entry_id, second.entry_id])

    assert [e.entry_id for e in response.entries] == [third.entry_id, first.entry_id, second.entry_id]
    assert list(response.states) == []


@pytest.mark.cluster
async def test_get_entries_returns_the_viewers_states_and_counts(clients: Clients) -> None:
    liked, amplified, untouched = [await create_entry(clients, author="bob") for _ in range(3)]
    await clients.interactions.ToggleResonance(
        pb.ToggleResonanceRequest(user_id="alice", entry_id=liked.entry_id), metadata=auth("alice")
    )
    await clients.interactions.ToggleAmplification(
        pb.ToggleAmplificationRequest(user_id="alice", entry_id=amplified.entry_id), metadata=auth("alice")
    )
    asked = [untouched.entry_id, liked.entry_id, amplified.entry_id]

    response = await get_entries(clients, asked, metadata=auth("alice"), viewer_id="alice")

    assert list(response.states) == [
        pb.UserInteractionState(entry_id=untouched.entry_id),
        pb.UserInteractionState(entry_id=liked.entry_id, has_resonated=True),
        pb.UserInteractionState(entry_id=amplified.entry_id, has_amplified=True),
    ]
    assert [(e.counts.resonance_count, e.counts.amplification_count) for e in response.entries] == [(0, 0), (1, 0), (0, 1)]


@pytest.mark.parametrize("privacy", [pb.PRIVACY_PRIVATE, pb.PRIVACY_FOLLOWERS])
@pytest.mark.cluster
async def test_get_entries_hides_restricted_entries_from_others(clients: Clients, privacy: int) -> None:
    restricted = await create_entry(clients, privacy=privacy)
    public = await create_entry(clients)
    asked = [restricted.entry_id, public.entry_id]

    async def visible(metadata: Any, viewer_id: str = "") -> list[str]:
        return [e.entry_id for e in (await get_entries(clients, asked, metadata, viewer_id)).entries]

    assert await visible(auth("bob"), "bob") == [public.entry_id]
    assert await visible(auth("bob")) == [public.entry_id]
    assert await visible(SERVICE, "bob") == [public.entry_id]
    assert await visible(auth("alice"), "alice") == asked
    assert await visible(SERVICE) == asked


@pytest.mark.refused_in_python
async def test_get_entries_for_another_viewer_is_permission_denied(clients: Clients) -> None:
    entry = await create_entry(clients)
    error = await rpc_error(get_entries(clients, [entry.entry_id], metadata=auth("bob"), viewer_id="alice"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# DeleteEntry


async def test_delete_entry_keeps_its_place_in_the_tree(clients: Clients, db: asyncpg.Connection) -> None:
    entries = await build_tree(clients)
    before = list((await tree_page(clients, entries["root"].entry_id)).nodes)

    await delete_entry(clients, entries["b"].entry_id)

    assert (await get_entries(clients, [entries["b"].entry_id])).entries == []
    after = list((await tree_page(clients, entries["root"].entry_id)).nodes)
    assert [n.entry_id for n in after] == [n.entry_id for n in before]
    assert [n.entry_id for n in after if n.deleted] == [entries["b"].entry_id]
    assert await branch_count(clients, entries["root"].entry_id) == 3
    remaining = [entries[name].entry_id for name in ("b0", "b00", "c")]
    assert [e.entry_id for e in (await get_entries(clients, remaining)).entries] == remaining
    row = await db.fetchrow("SELECT title, content FROM entries WHERE entry_id = $1", entries["b"].entry_id)
    assert tuple(row) == ("", "")


async def test_delete_entry_twice_is_not_found(clients: Clients) -> None:
    entry = await create_entry(clients)
    await delete_entry(clients, entry.entry_id)
    error = await rpc_error(delete_entry(clients, entry.entry_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_entry_by_another_user_is_permission_denied(clients: Clients) -> None:
    entry = await create_entry(clients)

    by_service_as_bob = await rpc_error(delete_entry(clients, entry.entry_id, user="bob", metadata=SERVICE))
    bob_as_alice = await rpc_error(delete_entry(clients, entry.entry_id, user="alice", metadata=auth("bob")))

    assert by_service_as_bob.code() == grpc.StatusCode.PERMISSION_DENIED
    assert bob_as_alice.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [e.entry_id for e in (await get_entries(clients, [entry.entry_id])).entries] == [entry.entry_id]


async def test_delete_unknown_entry_is_not_found(clients: Clients) -> None:
    error = await rpc_error(delete_entry(clients, new_uuid()))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_retries_return_the_original_after_the_parent_is_deleted(clients: Clients) -> None:
    stub = clients.interactions
    parent = (await stub.CreateEntry(pb.CreateEntryRequest(author_id="alice", type="post"), metadata=SERVICE)).entry
    request = pb.CreateBranchRequest(author_id="bob", parent_entry_id=parent.entry_id, type="reply", request_id="r1")
    branch = (await stub.CreateBranch(request, metadata=SERVICE)).entry
    share = pb.RecordShareRequest(user_id="carol", entry_id=parent.entry_id, request_id="s1")
    assert (await stub.RecordShare(share, metadata=SERVICE)).recorded
    await stub.DeleteEntry(pb.DeleteEntryRequest(user_id="alice", entry_id=parent.entry_id), metadata=SERVICE)

    assert (await stub.CreateBranch(request, metadata=SERVICE)).entry.entry_id == branch.entry_id
    retried = await stub.RecordShare(share, metadata=SERVICE)
    assert not retried.recorded and retried.counts.share_count == 1


# Privacy: ids of entries a viewer may not see never reach that viewer


async def viewed_tree(clients: Clients, root_id: str, viewer: str | None, page_size: int = 100) -> list[pb.BranchNode]:
    """Every node of the tree as the viewer (None: a service) is shown it, page by page."""
    metadata = SERVICE if viewer is None else auth(viewer)

    def fetch(token: str) -> Awaitable[pb.GetBranchTreeResponse]:
        request = pb.GetBranchTreeRequest(root_entry_id=root_id, page_size=page_size, page_token=token)
        return clients.interactions.GetBranchTree(request, metadata=metadata)

    return [node for page in await all_pages(fetch, lambda page: page.nodes) for node in page]


# A conversation with one restricted reply (its privacy is the case under test);
# (name, parent, author, privacy), in creation order, None = the restricted one:
#   root               alice, public
#   ├── first          bob, public
#   ├── hidden         alice, restricted
#   │   ├── under      alice, public
#   │   │   └── deeper alice, public
#   │   └── beside     alice, public
#   └── last           bob, public
RESTRICTED_CONVERSATION = [
    ("first", "root", "bob", pb.PRIVACY_PUBLIC),
    ("hidden", "root", "alice", None),
    ("under", "hidden", "alice", pb.PRIVACY_PUBLIC),
    ("beside", "hidden", "alice", pb.PRIVACY_PUBLIC),
    ("deeper", "under", "alice", pb.PRIVACY_PUBLIC),
    ("last", "root", "bob", pb.PRIVACY_PUBLIC),
]


async def restricted_conversation(clients: Clients, restricted: int) -> dict[str, pb.Entry]:
    entries = {"root": await create_entry(clients, title="root")}
    for name, parent, author, privacy in RESTRICTED_CONVERSATION:
        entries[name] = await create_branch(
            clients, entries[parent].entry_id, author=author, title=name,
            privacy=restricted if privacy is None else privacy,
        )
    return entries


RESTRICTED = [pb.PRIVACY_PRIVATE, pb.PRIVACY_FOLLOWERS]


@pytest.mark.parametrize("privacy", RESTRICTED, ids=["private", "followers"])
@pytest.mark.parametrize("page_size", [1, 2, 100])
@pytest.mark.cluster
async def test_branch_tree_leaves_out_a_hidden_entry_with_its_subtree(
    clients: Clients, privacy: int, page_size: int
) -> None:
    entries = await restricted_conversation(clients, privacy)
    root_id = entries["root"].entry_id
    everything = expected_nodes(entries, ["root", "first", "hidden", "under", "deeper", "beside", "last"])

    assert await viewed_tree(clients, root_id, None, page_size) == everything
    assert await viewed_tree(clients, root_id, "alice", page_size) == everything
    seen_by_bob = await viewed_tree(clients, root_id, "bob", page_size)
    assert seen_by_bob == expected_nodes(entries, ["root", "first", "last"])
    hidden_ids = {entries[name].entry_id for name in ("hidden", "under", "deeper", "beside")}
    assert not hidden_ids & {i for node in seen_by_bob for i in (node.entry_id, node.parent_entry_id)}


@pytest.mark.parametrize("privacy", RESTRICTED, ids=["private", "followers"])
async def test_branch_tree_of_an_entry_under_a_hidden_parent_does_not_name_it(clients: Clients, privacy: int) -> None:
    entries = await restricted_conversation(clients, privacy)
    under = entries["under"]

    seen_by_bob = await viewed_tree(clients, under.entry_id, "bob")
    assert seen_by_bob == [
        pb.BranchNode(entry_id=under.entry_id, parent_entry_id="", depth=2, branch_order=0),
        expected_node(entries["deeper"]),
    ]
    assert (await viewed_tree(clients, under.entry_id, "alice"))[0].parent_entry_id == entries["hidden"].entry_id


@pytest.mark.parametrize("privacy", RESTRICTED, ids=["private", "followers"])
@pytest.mark.cluster
async def test_get_entries_names_a_parent_only_if_the_viewer_may_see_it(clients: Clients, privacy: int) -> None:
    entries = await restricted_conversation(clients, privacy)
    ids = [entries[name].entry_id for name in ("under", "first")]

    def parents(response: pb.GetEntriesResponse) -> list[tuple[str, str, str]]:
        return [(e.entry_id, e.parent_entry_id, e.root_entry_id) for e in response.entries]

    root_id, hidden_id = entries["root"].entry_id, entries["hidden"].entry_id
    assert parents(await get_entries(clients, ids, auth("bob"))) == [(ids[0], "", root_id), (ids[1], root_id, root_id)]
    assert parents(await get_entries(clients, ids, auth("bob"), viewer_id="bob")) == parents(
        await get_entries(clients, ids, auth("bob"))
    )
    for owner_or_service in (auth("alice"), SERVICE):
        assert parents(await get_entries(clients, ids, owner_or_service)) == [
            (ids[0], hidden_id, root_id), (ids[1], root_id, root_id)
        ]
    as_bob_by_service = await get_entries(clients, ids, SERVICE, viewer_id="bob")
    assert parents(as_bob_by_service) == parents(await get_entries(clients, ids, auth("bob")))


async def test_get_entries_and_create_branch_name_a_root_only_if_the_viewer_may_see_it(clients: Clients) -> None:
    """carol follows alice and replies publicly under alice's followers-only
    post; dave does not follow alice: he sees carol's reply and may answer it,
    but is never told the id of alice's post."""
    await clients.follows.Follow(fpb.FollowRequest(follower_id="carol", followed_id="alice"), metadata=auth("carol"))
    root = await create_entry(clients, privacy=pb.PRIVACY_FOLLOWERS)
    reply = await create_branch(clients, root.entry_id, author="carol")
    assert (reply.parent_entry_id, reply.root_entry_id) == (root.entry_id, root.entry_id)

    (seen,) = (await get_entries(clients, [reply.entry_id], auth("dave"))).entries
    assert (seen.parent_entry_id, seen.root_entry_id) == ("", "")
    answer = await create_branch(clients, reply.entry_id, author="dave")
    assert (answer.parent_entry_id, answer.root_entry_id) == (reply.entry_id, "")
    (again,) = (await get_entries(clients, [answer.entry_id], auth("carol"))).entries
    assert (again.parent_entry_id, again.root_entry_id) == (reply.entry_id, root.entry_id)


@pytest.mark.cluster
async def test_branch_count_counts_every_reply_seen_or_not(clients: Clients, db: asyncpg.Connection) -> None:
    """A count names no entry; it allocates branch_order, so it equals the children."""
    entries = await restricted_conversation(clients, pb.PRIVACY_PRIVATE)
    root_id = entries["root"].entry_id
    for caller in (auth("bob"), auth("alice"), SERVICE):
        (root,) = (await get_entries(clients, [root_id], caller)).entries
        assert root.counts.branch_count == 3
    assert await children_rows(db, root_id) == [0, 1, 2]
    assert await counter_drift(db) == 0
