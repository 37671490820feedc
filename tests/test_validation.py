"""Input validation of every InteractionService RPC.

Bad input is INVALID_ARGUMENT with a BadRequest detail naming the field, and
nothing is written. Each case changes one field of a request that is otherwise
valid (test_base_requests_succeed proves it), and that names the seeded entry,
so a request that slipped past validation would really write something.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from conftest import SERVICE, Clients, NexusServer, bad_request_fields, new_uuid, rpc_error, with_database
from conftest import test_config as server_config
from nexus import database
from nexus.v1 import interaction_pb2 as pb

USER = "alice"
ENTRY = "$entry"  # stands for the seeded entry's id (also inside strings, for unique request ids)
TABLES = ("entries", "reactions", "shares", "entry_counter_shards", "user_interactions")

ENTRY_FIELDS = dict(type="post", title="title", content="content", privacy=pb.PRIVACY_PUBLIC, tags=["tag"])

# One valid request per RPC; the cases below each break one field of it.
BASE: dict[str, tuple[type, dict[str, Any]]] = {
    "CreateEntry": (pb.CreateEntryRequest, dict(author_id=USER, request_id=f"create-{ENTRY}", **ENTRY_FIELDS)),
    "CreateBranch": (pb.CreateBranchRequest, dict(author_id=USER, parent_entry_id=ENTRY, request_id=f"branch-{ENTRY}", **ENTRY_FIELDS)),
    "GetEntries": (pb.GetEntriesRequest, dict(entry_ids=[ENTRY], viewer_id=USER)),
    "DeleteEntry": (pb.DeleteEntryRequest, dict(user_id=USER, entry_id=ENTRY)),
    "ToggleResonance": (pb.ToggleResonanceRequest, dict(user_id=USER, entry_id=ENTRY)),
    "SetResonance": (pb.SetResonanceRequest, dict(user_id=USER, entry_id=ENTRY, resonated=True)),
    "ToggleAmplification": (pb.ToggleAmplificationRequest, dict(user_id=USER, entry_id=ENTRY)),
    "SetAmplification": (pb.SetAmplificationRequest, dict(user_id=USER, entry_id=ENTRY, amplified=True)),
    "RecordShare": (pb.RecordShareRequest, dict(user_id=USER, entry_id=ENTRY, request_id=f"share-{ENTRY}")),
    "GetBranchTree": (pb.GetBranchTreeRequest, dict(root_entry_id=ENTRY, viewer_id=USER)),
    "GetInteractionCounts": (pb.GetInteractionCountsRequest, dict(entry_ids=[ENTRY])),
    "GetUserInteractionStates": (pb.GetUserInteractionStatesRequest, dict(user_id=USER, entry_ids=[ENTRY])),
    "ListResonators": (pb.ListResonatorsRequest, dict(entry_id=ENTRY)),
    "RecordInteraction": (pb.RecordInteractionRequest, dict(user_id=USER, target_id="grant:1", action="saved", notes="n")),
    "ListInteractions": (pb.ListInteractionsRequest, dict(user_id=USER, action="saved")),
}
LISTS = {"GetBranchTree", "ListResonators", "ListInteractions"}


def build(rpc: str, seeded: str, /, **overrides: Any) -> Any:
    cls, fields = BASE[rpc]
    values = {**fields, **overrides}

    def resolve(v: Any) -> Any:
        if isinstance(v, list):
            return [resolve(x) for x in v]
        return v.replace(ENTRY, seeded) if isinstance(v, str) else v

    metadata = values.pop("metadata", None)
    request = cls(**{k: resolve(v) for k, v in values.items()})
    if metadata is not None:
        request.metadata.update(metadata)
    return request


def call(clients: Any, rpc: str, request: Any, metadata: Any = SERVICE) -> Any:
    return getattr(clients.interactions, rpc)(request, metadata=metadata)


async def snapshot(db: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every table, as text: equal snapshots mean nothing was written."""
    return {t: [r[0] for r in await db.fetch(f"SELECT t::text FROM {t} t ORDER BY 1")] for t in TABLES}


def names(fields: list[str], field: str) -> bool:
    """Whether the violations name field itself or one element of it (tags[3])."""
    return any(f == field or f.startswith(field + "[") for f in fields)


@pytest.fixture(scope="module")
async def shared(pg_admin_url: str, template_db: str) -> AsyncIterator[tuple[Clients, asyncpg.Connection]]:
    """One server and database for a module's many single-call cases (test_auth uses it too).

    Sharing is sound: each case names its own fresh entry and compares
    snapshots taken just before and after its own calls. It keeps both files fast.
    """
    name = f"nexus_shared_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    url = with_database(pg_admin_url, name)
    server = NexusServer(server_config(url))
    await server.start()
    conn = await database.connect(url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Clients(channel), conn
    finally:
        await conn.close()
        await server.stop(grace=0)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def entry_id(shared: tuple[Clients, asyncpg.Connection]) -> str:
    """A fresh public entry of alice's, which the cases' requests name."""
    response = await shared[0].interactions.CreateEntry(
        pb.CreateEntryRequest(author_id=USER, type="post", title="seed"), metadata=SERVICE
    )
    return response.entry.entry_id


# ---------------------------------------------------------------- the cases


def case(rpc: str, field: str, label: str, **overrides: Any) -> Any:
    return pytest.param(rpc, overrides, field, id=f"{rpc}-{field}-{label}")


BAD_USER_IDS = {"empty": "", "129_chars": "u" * 129, "space": "al ice", "slash": "a/b", "non_ascii": "alicé", "nul": "a\x00"}
BAD_UUIDS = {"empty": "", "word": "not-a-uuid", "short": "123e4567-e89b-12d3-a456-42661417400", "injection": "' OR ''='"}
BAD_WORDS = {"empty": "", "uppercase": "Saved", "too_long": "a" * 33, "digit_first": "1st", "space": "sa ved", "dash": "sa-ved"}
BAD_TOKENS = {
    "abc": "abc",
    "random_base64": base64.urlsafe_b64encode(random.Random(0).randbytes(48)).decode(),
    "forged_mac": base64.urlsafe_b64encode(b'["interactions:alice:saved",0,"x"]' + bytes(16)).decode(),
    "not_base64": "%%%",
}

USER_ID_FIELDS = [
    ("CreateEntry", "author_id"), ("CreateBranch", "author_id"), ("DeleteEntry", "user_id"),
    ("ToggleResonance", "user_id"), ("SetResonance", "user_id"), ("ToggleAmplification", "user_id"),
    ("SetAmplification", "user_id"), ("RecordShare", "user_id"), ("GetUserInteractionStates", "user_id"),
    ("RecordInteraction", "user_id"), ("RecordInteraction", "target_id"), ("ListInteractions", "user_id"),
]
VIEWER_FIELDS = [("GetEntries", "viewer_id"), ("GetBranchTree", "viewer_id")]  # empty = no viewer, valid
ENTRY_ID_FIELDS = [
    ("CreateBranch", "parent_entry_id"), ("DeleteEntry", "entry_id"), ("ToggleResonance", "entry_id"),
    ("SetResonance", "entry_id"), ("ToggleAmplification", "entry_id"), ("SetAmplification", "entry_id"),
    ("RecordShare", "entry_id"), ("GetBranchTree", "root_entry_id"), ("ListResonators", "entry_id"),
]
BATCH_RPCS = ["GetEntries", "GetInteractionCounts", "GetUserInteractionStates"]
TOO_MANY_IDS = [ENTRY] + [new_uuid() for _ in range(1000)]

CASES = [
    *(case(rpc, f, label, **{f: v}) for rpc, f in USER_ID_FIELDS for label, v in BAD_USER_IDS.items()),
    *(case(rpc, f, label, **{f: v}) for rpc, f in VIEWER_FIELDS for label, v in BAD_USER_IDS.items() if v),
    *(case(rpc, f, label, **{f: v}) for rpc, f in ENTRY_ID_FIELDS for label, v in BAD_UUIDS.items()),
    *(case(rpc, "entry_ids", label, entry_ids=[ENTRY, v]) for rpc in BATCH_RPCS for label, v in BAD_UUIDS.items()),
    *(case(rpc, "entry_ids", "1001_ids", entry_ids=TOO_MANY_IDS) for rpc in BATCH_RPCS),
    *(
        c
        for rpc in ("CreateEntry", "CreateBranch")
        for c in (
            *(case(rpc, "type", label, type=v) for label, v in BAD_WORDS.items()),
            case(rpc, "title", "301_chars", title="t" * 301),
            case(rpc, "content", "40001_chars", content="c" * 40_001),
            case(rpc, "content", "nul", content="a\x00b"),
            case(rpc, "privacy", "99", privacy=99),
            case(rpc, "privacy", "negative", privacy=-1),
            case(rpc, "tags", "33_tags", tags=[f"t{i}" for i in range(33)]),
            case(rpc, "tags", "65_char_tag", tags=["ok", "t" * 65]),
            case(rpc, "tags", "empty_tag", tags=["ok", ""]),
            case(rpc, "metadata", "17_kib", metadata={"blob": "x" * 17 * 1024}),
            case(rpc, "metadata", "nul", metadata={"k": "a\x00b"}),
            case(rpc, "metadata", "nan", metadata={"k": float("nan")}),
            case(rpc, "metadata", "infinity", metadata={"k": float("inf")}),
            case(rpc, "request_id", "65_chars", request_id="r" * 65),
            case(rpc, "request_id", "space", request_id="req 1"),
        )
    ),
    *(case("RecordInteraction", "action", label, action=v) for label, v in BAD_WORDS.items()),
    *(case("ListInteractions", "action", label, action=v) for label, v in BAD_WORDS.items() if v),  # empty = no filter
    case("RecordInteraction", "notes", "2001_chars", notes="n" * 2001),
    case("RecordInteraction", "notes", "nul", notes="a\x00b"),
    case("RecordShare", "request_id", "missing", request_id=""),
    case("RecordShare", "request_id", "65_chars", request_id="r" * 65),
    case("RecordShare", "request_id", "space", request_id="share 1"),
    case("GetBranchTree", "max_depth", "negative", max_depth=-1),
    *(case(rpc, "page_size", "negative", page_size=-1) for rpc in sorted(LISTS)),
    *(case(rpc, "page_token", label, page_token=v) for rpc in sorted(LISTS) for label, v in BAD_TOKENS.items()),
]


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("rpc", BASE)
async def test_base_requests_succeed(shared: Any, entry_id: str, rpc: str) -> None:
    await call(shared[0], rpc, build(rpc, entry_id))


@pytest.mark.parametrize(("rpc", "overrides", "field"), CASES)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    shared: Any, entry_id: str, rpc: str, overrides: dict[str, Any], field: str
) -> None:
    clients, db = shared
    before = await snapshot(db)
    error = await rpc_error(call(clients, rpc, build(rpc, entry_id, **overrides)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    fields = bad_request_fields(error)
    assert names(fields, field), f"BadRequest names {fields}, expected {field!r}"
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    ("rpc", "overrides"),
    [
        pytest.param("CreateEntry", dict(title="t" * 300, content="c" * 40_000), id="title_300_content_40000"),
        pytest.param("CreateEntry", dict(title="é" * 300), id="title_300_non_ascii_chars"),
        pytest.param("CreateEntry", dict(type="a" * 32), id="type_32_chars"),
        pytest.param("CreateEntry", dict(type="a1_b"), id="type_digits_underscore"),
        pytest.param("CreateEntry", dict(author_id="u" * 128), id="author_id_128_chars"),
        pytest.param("CreateEntry", dict(author_id="A-z_0.9:x@y"), id="author_id_all_punctuation"),
        pytest.param("CreateEntry", dict(tags=[f"t{i % 32}" for i in range(40)]), id="40_tags_32_distinct"),
        pytest.param("CreateEntry", dict(tags=["t" * 64]), id="tag_64_chars"),
        pytest.param("CreateEntry", dict(metadata={"blob": "x" * 16_000}), id="metadata_under_16_kib"),
        pytest.param("CreateEntry", dict(request_id="r" * 64), id="request_id_64_chars"),
        pytest.param("CreateEntry", dict(privacy=pb.PRIVACY_UNSPECIFIED), id="privacy_unspecified"),
        pytest.param("RecordShare", dict(request_id="~" * 64), id="share_request_id_64_chars"),
        pytest.param("RecordInteraction", dict(notes="n" * 2000, action="a" * 32), id="notes_2000_action_32"),
        pytest.param("RecordInteraction", dict(target_id="t" * 128), id="target_id_128_chars"),
        pytest.param("GetEntries", dict(entry_ids=TOO_MANY_IDS[:1000]), id="entries_1000_ids"),
        pytest.param("GetInteractionCounts", dict(entry_ids=TOO_MANY_IDS[:1000]), id="counts_1000_ids"),
        pytest.param("GetUserInteractionStates", dict(entry_ids=TOO_MANY_IDS[:1000]), id="states_1000_ids"),
        pytest.param("ListInteractions", dict(action=""), id="list_interactions_no_filter"),
        *(pytest.param(rpc, dict(page_size=5000), id=f"{rpc}_page_size_5000") for rpc in sorted(LISTS)),
    ],
)
async def test_values_at_the_limits_are_accepted(shared: Any, entry_id: str, rpc: str, overrides: dict[str, Any]) -> None:
    await call(shared[0], rpc, build(rpc, entry_id, **overrides))


async def record_interactions(clients: Any, count: int) -> None:
    for i in range(count):
        await clients.interactions.RecordInteraction(
            pb.RecordInteractionRequest(user_id=USER, target_id=f"grant:{i}", action="saved"), metadata=SERVICE
        )


async def list_interactions(clients: Any, **fields: Any) -> pb.ListInteractionsResponse:
    return await clients.interactions.ListInteractions(pb.ListInteractionsRequest(user_id=USER, **fields), metadata=SERVICE)


async def test_page_size_zero_means_default_of_50(clients: Any) -> None:
    await record_interactions(clients, 51)
    first = await list_interactions(clients, page_size=0)
    assert len(first.interactions) == 50
    assert first.next_page_token
    last = await list_interactions(clients, page_size=0, page_token=first.next_page_token)
    assert len(last.interactions) == 1
    assert last.next_page_token == ""
    targets = {i.target_id for i in [*first.interactions, *last.interactions]}
    assert targets == {f"grant:{i}" for i in range(51)}


async def test_page_size_above_1000_is_coerced_to_1000(clients: Any, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO user_interactions (user_id, target_id, action, notes)"
        " SELECT $1, 'grant:' || g, 'saved', '' FROM generate_series(1, 1001) g",
        USER,
    )
    first = await list_interactions(clients, page_size=5000)
    assert len(first.interactions) == 1000
    assert first.next_page_token
    rest = await list_interactions(clients, page_size=5000, page_token=first.next_page_token)
    assert len(rest.interactions) == 1
    assert rest.next_page_token == ""


# ------------------------------------------- page tokens are bound to their list


@pytest.fixture
async def tokens(clients: Any) -> dict[str, str]:
    """A second-page token of each list kind, for entry A / user alice; each works on its own list."""
    api = clients.interactions
    a, b = [(await api.CreateEntry(pb.CreateEntryRequest(author_id=USER, type="post"), metadata=SERVICE)).entry.entry_id
            for _ in range(2)]
    for entry in (a, b):
        for user in ("u1", "u2"):
            await api.SetResonance(pb.SetResonanceRequest(user_id=user, entry_id=entry, resonated=True), metadata=SERVICE)
        await api.CreateBranch(pb.CreateBranchRequest(author_id=USER, parent_entry_id=entry, type="reply"), metadata=SERVICE)
    for target in ("grant:1", "grant:2"):
        await api.RecordInteraction(
            pb.RecordInteractionRequest(user_id=USER, target_id=target, action="saved"), metadata=SERVICE
        )
    resonators = await api.ListResonators(pb.ListResonatorsRequest(entry_id=a, page_size=1), metadata=SERVICE)
    tree = await api.GetBranchTree(pb.GetBranchTreeRequest(root_entry_id=a, page_size=1), metadata=SERVICE)
    interactions = await list_interactions(clients, page_size=1)
    found = {"a": a, "b": b, "resonators": resonators.next_page_token, "tree": tree.next_page_token,
             "interactions": interactions.next_page_token}
    assert all(found.values())
    # Each token continues its own list.
    assert len((await api.ListResonators(
        pb.ListResonatorsRequest(entry_id=a, page_size=1, page_token=found["resonators"]), metadata=SERVICE)).user_ids) == 1
    assert len((await api.GetBranchTree(
        pb.GetBranchTreeRequest(root_entry_id=a, page_size=1, page_token=found["tree"]), metadata=SERVICE)).nodes) == 1
    assert len((await list_interactions(clients, page_size=1, page_token=found["interactions"])).interactions) == 1
    return found


FOREIGN_TOKEN_CASES = {  # id: (whose token, used on which rpc, with which request fields)
    "resonators_of_a_on_b": ("resonators", "ListResonators", lambda t: dict(entry_id=t["b"])),
    "tree_of_a_on_b": ("tree", "GetBranchTree", lambda t: dict(root_entry_id=t["b"])),
    "interactions_of_alice_on_bob": ("interactions", "ListInteractions", lambda t: dict(user_id="bob")),
    "interactions_unfiltered_on_filtered": ("interactions", "ListInteractions", lambda t: dict(user_id=USER, action="saved")),
    "resonators_on_interactions": ("resonators", "ListInteractions", lambda t: dict(user_id=USER)),
    "interactions_on_resonators": ("interactions", "ListResonators", lambda t: dict(entry_id=t["a"])),
    "tree_on_resonators": ("tree", "ListResonators", lambda t: dict(entry_id=t["a"])),
    "resonators_on_tree": ("resonators", "GetBranchTree", lambda t: dict(root_entry_id=t["a"])),
}


@pytest.mark.parametrize(("token_of", "rpc", "fields"), FOREIGN_TOKEN_CASES.values(), ids=FOREIGN_TOKEN_CASES.keys())
async def test_page_token_of_another_list_is_invalid_argument(
    clients: Any, db: asyncpg.Connection, tokens: dict[str, str], token_of: str, rpc: str, fields: Any
) -> None:
    request = BASE[rpc][0](**fields(tokens), page_size=1, page_token=tokens[token_of])
    before = await snapshot(db)
    error = await rpc_error(call(clients, rpc, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert names(bad_request_fields(error), "page_token")
    assert await snapshot(db) == before
