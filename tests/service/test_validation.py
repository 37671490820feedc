"""Input validation of every InteractionService RPC, and odd input on any service.

Bad input is INVALID_ARGUMENT with a BadRequest detail naming the field, and
nothing is written. Each case changes one field of a request that is otherwise
valid (test_base_requests_succeed proves it), and that names the seeded entry,
so a request that slipped past validation would really write something.

The last part holds the odd input of any service that once answered INTERNAL
or UNKNOWN: Timestamps out of range, Structs nested past the limit or past
protobuf's decoding depth, requests that cannot be decoded at all, embeddings
whose cosine is undefined (see also test_fuzz.py).
"""

from __future__ import annotations

import base64
import math
import random
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2

from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import memory_pb2 as memory_pb
from nexus.v1 import token_pb2 as token_pb

from support.rpc import SERVER_TOKENS, SERVICE, SIGNED_ODD_POSITIONS, Clients, bad_request_fields, new_uuid, rpc_error

USER = "alice"
ENTRY = "$entry"  # stands for the seeded entry's id (also inside strings, for unique request ids)
TABLES = ("entries", "reactions", "shares", "entry_counter_shards", "user_interactions")

ENTRY_FIELDS = dict(type="post", title="title", content="content", privacy=pb.PRIVACY_PUBLIC, tags=["tag"])

# One valid request per RPC; the cases below each break one field of it.
BASE: dict[str, tuple[type, dict[str, Any]]] = {
    "CreateEntry": (pb.CreateEntryRequest, dict(author_id=USER, request_id=f"create-{ENTRY}", **ENTRY_FIELDS)),
    "CreateBranch": (
        pb.CreateBranchRequest, dict(author_id=USER, parent_entry_id=ENTRY, request_id=f"branch-{ENTRY}", **ENTRY_FIELDS)
    ),
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


# ------------------------------- odd input on any service: never INTERNAL / UNKNOWN

MEMORY_USER = "odd_input"
DIM = 384
EMBEDDING = [((i * 37) % 11 - 5) / 7 for i in range(DIM)]
MEMORY_TABLES = ("memories", "memory_events", "memory_requests")


def nested(depth: int, *, lists: bool = False) -> dict[str, Any]:
    """A Struct value of ``depth`` levels of objects (or of arrays in one object)."""
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value] if lists else {"k": value}
    return {"k": value}


async def memory_snapshot(db: asyncpg.Connection) -> list[str]:
    return [r[0] for t in MEMORY_TABLES for r in await db.fetch(f"SELECT t::text FROM {t} t ORDER BY 1")]


@pytest.fixture
async def memory_id(shared: tuple[Clients, asyncpg.Connection]) -> str:
    response = await shared[0].memories.CreateMemory(
        memory_pb.CreateMemoryRequest(user_id=MEMORY_USER, content="seed", embedding=EMBEDDING), metadata=SERVICE
    )
    return response.memory.memory_id


def since_request(rpc: str, seconds: int, nanos: int) -> Any:
    since = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    if rpc == "ListMemories":
        return memory_pb.ListMemoriesRequest(user_id=MEMORY_USER, since=since)
    # The module's shared user gathers many memories with this embedding: ask for all of them.
    return memory_pb.SearchMemoriesRequest(user_id=MEMORY_USER, embedding=EMBEDDING, since=since, top_k=1000)


@pytest.mark.parametrize("rpc", ["ListMemories", "SearchMemories"])
@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        pytest.param(253402300800, 0, id="year-10000"),
        pytest.param(-62135596801, 0, id="before-year-1"),
        pytest.param(2**62, 0, id="seconds-2^62"),
        pytest.param(-(2**62), 0, id="seconds-minus-2^62"),
        pytest.param(0, -5, id="nanos-negative"),
        pytest.param(0, 1_000_000_000, id="nanos-one-second"),
        pytest.param(0, 2_000_000_000, id="nanos-2e9"),
    ],
)
async def test_a_timestamp_out_of_range_is_invalid_argument_naming_it(
    shared: Any, memory_id: str, rpc: str, seconds: int, nanos: int
) -> None:
    error = await rpc_error(getattr(shared[0].memories, rpc)(since_request(rpc, seconds, nanos), metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == ["since"]


@pytest.mark.parametrize("rpc", ["ListMemories", "SearchMemories"])
async def test_timestamps_at_the_ends_of_the_range_are_accepted(shared: Any, memory_id: str, rpc: str) -> None:
    def found(response: Any) -> list[str]:
        memories = response.memories if rpc == "ListMemories" else [r.memory for r in response.results]
        return [m.memory_id for m in memories]

    call = getattr(shared[0].memories, rpc)
    assert memory_id in found(await call(since_request(rpc, -62135596800, 0), metadata=SERVICE))  # 0001-01-01
    assert found(await call(since_request(rpc, 253402300799, 999_999_999), metadata=SERVICE)) == []  # 9999-12-31


STRUCT_RPCS = [("CreateEntry", "metadata"), ("CreateBranch", "metadata"), ("PublishBroadcast", "payload")]


def struct_request(rpc: str, entry_id: str, value: dict[str, Any]) -> Any:
    if rpc == "PublishBroadcast":
        request = memory_pb.PublishBroadcastRequest(user_id=MEMORY_USER, event="typing")
        request.payload.update(value)
        return request
    return build(rpc, entry_id, metadata=value)


async def struct_call(clients: Clients, rpc: str, request: Any) -> Any:
    api = clients.memories if rpc == "PublishBroadcast" else clients.interactions
    return await getattr(api, rpc)(request, metadata=SERVICE)


@pytest.mark.parametrize(("rpc", "field"), STRUCT_RPCS)
@pytest.mark.parametrize(
    ("depth", "lists"),
    [
        pytest.param(33, False, id="33-objects"),  # decodes; over the limit
        pytest.param(34, False, id="34-objects"),  # past protobuf's decoding depth
        pytest.param(45, False, id="45-objects"),
        pytest.param(200, False, id="200-objects"),
        pytest.param(33, True, id="33-arrays"),
        pytest.param(60, True, id="60-arrays"),
    ],
)
async def test_a_struct_nested_too_deeply_is_invalid_argument_naming_it(
    shared: Any, entry_id: str, rpc: str, field: str, depth: int, lists: bool
) -> None:
    clients, db = shared
    before = await snapshot(db)
    error = await rpc_error(struct_call(clients, rpc, struct_request(rpc, entry_id, nested(depth, lists=lists))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == [field]
    assert "upb" not in error.details()
    assert await snapshot(db) == before


async def test_a_struct_of_32_levels_is_stored_and_reads_back(shared: Any, entry_id: str) -> None:
    clients, _ = shared
    for value in (nested(32), nested(32, lists=True)):
        request = struct_request("CreateEntry", entry_id, value)
        request.request_id = ""
        created = await struct_call(clients, "CreateEntry", request)
        read = await clients.interactions.GetEntries(pb.GetEntriesRequest(entry_ids=[created.entry.entry_id]), metadata=SERVICE)
        assert json_format.MessageToDict(read.entries[0].metadata) == value
    await struct_call(clients, "PublishBroadcast", struct_request("PublishBroadcast", entry_id, nested(32)))


def raw_call(clients: Clients, method: str, data: bytes, metadata: Any = SERVICE, *, stream: bool = False) -> Any:
    """A call whose request bytes are sent as they are (no client-side encoding)."""
    multicallable = clients.channel.unary_stream if stream else clients.channel.unary_unary
    return multicallable(method)(data, metadata=metadata)


NOT_UTF8_USER_ID = b"\x0a\x02\xff\xfe"  # field 1 (user_id / author_id), 2 bytes that are not UTF-8


@pytest.mark.parametrize(
    ("method", "data", "field"),
    [
        pytest.param("/nexus.v1.InteractionService/CreateEntry", NOT_UTF8_USER_ID, "author_id", id="not-utf8-string"),
        pytest.param(
            "/nexus.v1.InteractionService/CreateEntry", NOT_UTF8_USER_ID + b"\x12\x04post", "author_id", id="not-utf8-among-valid"
        ),
        pytest.param("/nexus.v1.MemoryService/CreateMemory", b"\x12\x03\xed\xa0\x80", "content", id="surrogate"),
        pytest.param("/nexus.v1.TokenService/Credit", b"\xff\xff\xff\xff", "", id="not-protobuf"),
        pytest.param("/nexus.v1.FollowService/Follow", b"\x0a\x05ab", "", id="truncated"),
    ],
)
async def test_an_undecodable_request_is_invalid_argument_with_no_decoder_internals(
    shared: Any, method: str, data: bytes, field: str
) -> None:
    clients, db = shared
    before = await snapshot(db)
    error = await rpc_error(raw_call(clients, method, data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == [field]
    assert "upb" not in error.details() and "parsing" not in error.details()
    assert await snapshot(db) == before


async def test_an_undecodable_stream_request_ends_the_stream_with_invalid_argument(shared: Any) -> None:
    call = raw_call(shared[0], "/nexus.v1.MemoryService/SubscribeMemories", NOT_UTF8_USER_ID, stream=True)
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["user_id"]


async def test_an_undecodable_request_without_a_token_is_unauthenticated(shared: Any) -> None:
    error = await rpc_error(raw_call(shared[0], "/nexus.v1.InteractionService/CreateEntry", NOT_UTF8_USER_ID, metadata=()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


EMBEDDING_RPCS = [("CreateMemory", "embedding"), ("UpdateMemory", "memory.embedding"), ("SearchMemories", "embedding")]


def embedding_request(rpc: str, memory_id: str, embedding: list[float]) -> Any:
    if rpc == "CreateMemory":
        return memory_pb.CreateMemoryRequest(user_id=MEMORY_USER, content="odd vector", embedding=embedding)
    if rpc == "UpdateMemory":
        return memory_pb.UpdateMemoryRequest(
            memory=memory_pb.Memory(user_id=MEMORY_USER, memory_id=memory_id, embedding=embedding),
            update_mask=field_mask_pb2.FieldMask(paths=["embedding"]),
        )
    return memory_pb.SearchMemoriesRequest(user_id=MEMORY_USER, embedding=embedding)


@pytest.mark.parametrize(("rpc", "field"), EMBEDDING_RPCS)
@pytest.mark.parametrize(
    "embedding",
    [
        pytest.param([1e-45] * DIM, id="subnormal"),  # squares underflow to 0 in float32: NaN cosine
        pytest.param([1e-21] * DIM, id="squares-sum-below-float32-normal"),
        pytest.param([1e20] * DIM, id="squares-overflow-float32"),
        pytest.param([3e38] + [0.0] * (DIM - 1), id="one-huge-value"),
        pytest.param([0.0] * DIM, id="zeros"),
    ],
)
async def test_an_embedding_without_a_direction_is_invalid_argument(
    shared: Any, memory_id: str, rpc: str, field: str, embedding: list[float]
) -> None:
    clients, db = shared
    before = await memory_snapshot(db)
    error = await rpc_error(getattr(clients.memories, rpc)(embedding_request(rpc, memory_id, embedding), metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == [field]
    assert await memory_snapshot(db) == before


@pytest.mark.parametrize(
    "embedding",
    [
        pytest.param([1e-20] * DIM, id="tiny"),  # squares are float32 subnormals, their sum is not
        pytest.param([6e17] * DIM, id="huge"),  # squares sum to 1.4e38, under 2^127
        pytest.param([-1.0] + [0.0] * (DIM - 1), id="one-axis"),
    ],
)
async def test_an_embedding_near_the_limits_is_stored_and_its_distances_are_numbers(
    shared: Any, memory_id: str, embedding: list[float]
) -> None:
    clients, _ = shared
    await clients.memories.CreateMemory(embedding_request("CreateMemory", memory_id, embedding), metadata=SERVICE)
    for metric in (memory_pb.DISTANCE_METRIC_COSINE, memory_pb.DISTANCE_METRIC_L2):
        for query in (embedding, EMBEDDING):
            response = await clients.memories.SearchMemories(
                memory_pb.SearchMemoriesRequest(user_id=MEMORY_USER, embedding=query, metric=metric, top_k=1000), metadata=SERVICE
            )
            assert response.results
            assert not any(math.isnan(r.distance) for r in response.results)


# A token signed with the server's key (as an attacker who has the secret could)
# holding what the service never issues: INVALID_ARGUMENT naming the field.
def signed_odd_requests(entry_id: str, position: list[Any]) -> list[tuple[str, Any, str]]:
    """(rpc, request, token field) of every list whose token a position can break."""

    def token(*scope: Any) -> str:
        return SERVER_TOKENS.encode(tuple(scope), position)

    return [
        ("ListTransactions", token_pb.ListTransactionsRequest(user_id=USER, page_token=token("transactions", USER)),
         "page_token"),
        ("GetBranchTree", pb.GetBranchTreeRequest(root_entry_id=entry_id, viewer_id=USER,
                                                  page_token=token("tree", entry_id, 0, USER)), "page_token"),
        ("SubscribeMemories", memory_pb.SubscribeMemoriesRequest(user_id=USER,
                                                                 resume_token=token("events", "memory", USER)),
         "resume_token"),
    ]


@pytest.mark.parametrize("position", SIGNED_ODD_POSITIONS.values(), ids=SIGNED_ODD_POSITIONS.keys())
async def test_a_signed_token_the_service_never_issued_is_invalid_argument(
    shared: tuple[Clients, asyncpg.Connection], entry_id: str, position: list[Any]
) -> None:
    clients, _ = shared
    for rpc, request, field in signed_odd_requests(entry_id, position):
        if rpc == "SubscribeMemories":
            stream = clients.memories.SubscribeMemories(request, metadata=SERVICE, timeout=10)
            error = await rpc_error(stream.read())
        else:
            service = clients.tokens if rpc == "ListTransactions" else clients.interactions
            error = await rpc_error(getattr(service, rpc)(request, metadata=SERVICE, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{rpc} {position}: {error.code()} {error.details()}"
        assert bad_request_fields(error) == [field], rpc


# Tiny floats: a product of two of them underflows a double, which PostgreSQL
# reports as an error rather than 0. No search may fail for it.
TINY = (1e-200, 1e-310, 5e-324)


async def test_tiny_gravities_and_weights_never_fail_a_search(shared: tuple[Clients, asyncpg.Connection]) -> None:
    clients, db = shared
    user = "tiny_floats"
    metadata = SERVICE
    for n, gravity in enumerate((*TINY, 0.0, 0.9)):
        await clients.memories.CreateMemory(
            memory_pb.CreateMemoryRequest(user_id=user, content=f"lake {n}", gravity_score=gravity, embedding=EMBEDDING),
            metadata=metadata,
        )
    # A subnormal stored before the service normalised them (or written by hand).
    await db.execute("UPDATE memories SET gravity_score = 5e-324 WHERE user_id = $1 AND content = 'lake 0'", user)
    smallest = "SELECT min(gravity_score) FILTER (WHERE gravity_score > 0) FROM memories WHERE user_id = $1"
    assert await db.fetchval(smallest, user) == 5e-324
    for weight in (*TINY, 0.1):
        both = dict(gravity_weight=weight, recency_weight=weight)
        for weights in (dict(gravity_weight=weight), dict(recency_weight=weight), both):
            for query in (dict(query="lake"), dict(embedding=EMBEDDING), dict(query="lake", embedding=EMBEDDING)):
                request = memory_pb.SearchMemoriesRequest(user_id=user, top_k=10, **query, **weights)
                reply = await clients.memories.SearchMemories(request, metadata=metadata, timeout=10)
                assert len(reply.results) == 5, (weights, query)
                scores = [r.score for r in reply.results]
                assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True), scores


async def test_a_subnormal_score_is_stored_as_zero(shared: tuple[Clients, asyncpg.Connection]) -> None:
    clients, _ = shared
    for value in (5e-324, 1e-310):
        reply = await clients.memories.CreateMemory(
            memory_pb.CreateMemoryRequest(user_id="subnormal", content="x", gravity_score=value), metadata=SERVICE
        )
        assert reply.memory.gravity_score == 0.0
    reply = await clients.memories.CreateMemory(
        memory_pb.CreateMemoryRequest(user_id="subnormal", content="y", gravity_score=1e-200), metadata=SERVICE
    )
    assert reply.memory.gravity_score == 1e-200
