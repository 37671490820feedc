"""Property-based tests: odd input on every RPC of every service.

Requests are generated from the proto descriptors, so every field of every
RPC (and any field added later) gets odd values for its type: empty, huge and
unicode strings (NUL included), negative and extreme integers, NaN and
infinite floats, unknown enum numbers, out-of-range timestamps, Structs nested
past the limits, long repeated fields, malformed page tokens and ids. Each
field is just as often a valid value (the acting user, the seeded entry or
memory, a good embedding), so the odd ones reach the code behind validation.
The caller is usually the request's user, sometimes a service, sometimes
another user. For every call, unary or stream:

- the code is never INTERNAL or UNKNOWN;
- INVALID_ARGUMENT carries a BadRequest naming a field of the request;
- a call that fails wrote nothing (a checksum of every table is unchanged).

The run is seeded (derandomize) and bounded: NEXUS_FUZZ_EXAMPLES examples per
RPC (default 30; a fifth of that of random bytes). For a longer, random exploration:

    NEXUS_FUZZ_EXAMPLES=2000 ./.venv/bin/pytest tests/service/test_fuzz.py -q
"""

from __future__ import annotations

import base64
import math
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nexus.servicers.memory import UPDATABLE_FIELDS
from nexus.v1 import follow_pb2, interaction_pb2, memory_pb2, token_pb2

from support.rpc import SERVER_TOKENS, SERVICE, SIGNED_ODD_POSITIONS, Clients, auth, bad_request_fields

_EXAMPLES = os.environ.get("NEXUS_FUZZ_EXAMPLES")
settings.register_profile(
    "nexus-fuzz",
    max_examples=int(_EXAMPLES or 30),
    derandomize=not _EXAMPLES,  # reproducible in CI; random when exploring
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("nexus-fuzz")

USER = "fuzzer"
OTHER_USER = "fuzz_other"
DIM = 384
GOOD_EMBEDDING = [((i * 37) % 11 - 5) / 7 for i in range(DIM)]
RPCS = sorted(  # deletes last, so the seeded entry and memory are there for the others
    (
        pytest.param(method, id=f"{service.name}.{method.name}")
        for module in (interaction_pb2, follow_pb2, token_pb2, memory_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ),
    key=lambda param: param.values[0].name.startswith("Delete"),
)

# Fields that name the acting user, another user, or a stored thing.
ACTING_USER_FIELDS = {"user_id", "author_id", "follower_id", "viewer_id", "from_user_id"}
OTHER_USER_FIELDS = {"followed_id", "to_user_id", "target_id"}

# ------------------------------------------------------------------ odd values

ODD_STRINGS = st.sampled_from(
    [
        "", " ", "a\x00b", "\x00", "x" * 129, "é" * 300, "\u202e\u200b", "🙂" * 70, "' OR ''='", "../../etc",
        "NaN", "null", "-1", "0" * 65, "%%%", "a" * 70_000,
    ]
)  # fmt: skip
INT_BOUNDS = {
    descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
TIMESTAMP_SECONDS = [0, -1, 253402300799, 253402300800, -62135596800, -62135596801, 2**62, -(2**62), 2**63 - 1, -(2**63)]
TIMESTAMP_NANOS = [0, 999_999_999, 1_000_000_000, 2_000_000_000, -5, -(2**31), 2**31 - 1]


# Scores whose product underflows a double (PostgreSQL raises rather than round to 0).
TINY_FLOATS = [1e-200, 1e-310, 5e-324, 2.2250738585072014e-308]


def integers(field: descriptor.FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = INT_BOUNDS[field.type]
    return st.sampled_from(sorted({low, high, -1 if low else 0, 0, 1, 1000, 1001})) | st.integers(low, high)


def doubles(width: int = 64) -> st.SearchStrategy[float]:
    extremes = [math.nan, math.inf, -math.inf, -0.0, *(TINY_FLOATS if width == 64 else [1e-45]), 1e308 if width == 64 else 3e38]
    return st.sampled_from(extremes) | st.floats(width=width)


def nested(depth: int, leaf: Any = "leaf", *, lists: bool = False) -> dict[str, Any]:
    """A Struct of ``depth`` levels: objects in objects, or arrays in one object."""
    for _ in range(depth - 1):
        leaf = [leaf] if lists else {"k": leaf}
    return {"k": leaf}


JSON_LEAVES = st.none() | st.booleans() | st.floats(allow_nan=True) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)
STRUCTS = (
    st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5)
    | st.builds(nested, st.integers(1, 60), JSON_LEAVES, lists=st.booleans())
    | st.builds(lambda n: {"blob": "x" * n}, st.sampled_from([100, 7_000, 16_000, 17_000, 100_000]))
)


def timestamp(seconds: int, nanos: int) -> dict[str, int]:
    return {"seconds": seconds, "nanos": nanos}


TIMESTAMPS = st.builds(
    timestamp,
    st.sampled_from(TIMESTAMP_SECONDS) | st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(TIMESTAMP_NANOS) | st.integers(-(2**31), 2**31 - 1),
)


@dataclass(frozen=True)
class Seed:
    """What the fuzzer's user already has, so valid-looking ids reach the database."""

    entry_id: str
    memory_id: str
    pending_transfer_id: str
    page_tokens: tuple[str, ...]


# Tokens signed with the server's key holding what it never issues (a bigint
# overflow, a tree path beyond integer, nesting past the JSON decoder's depth).
SIGNED_ODD_TOKENS = [
    SERVER_TOKENS.encode(scope, position)
    for scope in (("transactions", USER), ("events", "memory", USER), ("events", "arc", USER))
    for position in SIGNED_ODD_POSITIONS.values()
] + [SERVER_TOKENS.sign(b'["transactions:' + USER.encode() + b'",' + b"[" * 2500 + b"]" * 2500 + b"]")]


def odd_page_tokens(seed: Seed) -> st.SearchStrategy[str]:
    forged = base64.urlsafe_b64encode(b'["transactions:fuzzer",1]' + bytes(16)).decode()
    tokens = ["", "abc", "%%%", forged, "A" * 10_000, *seed.page_tokens, *SIGNED_ODD_TOKENS]
    return st.sampled_from(tokens) | st.text(max_size=40)


def valid_fields(message_type: descriptor.Descriptor, seed: Seed) -> st.SearchStrategy[dict[str, Any]]:
    """Every field of the message that has an obvious valid value, set to one."""
    valid = {f.name: valid_value(f, seed) for f in message_type.fields}
    return st.fixed_dictionaries({name: value for name, value in valid.items() if value is not None})


def valid_value(field: descriptor.FieldDescriptor, seed: Seed) -> st.SearchStrategy[Any] | None:
    """A value that passes validation, by the field's name, or None when there is no obvious one."""
    name = field.name
    if field.message_type is not None and not field.is_repeated:
        full_name = field.message_type.full_name
        if full_name == "google.protobuf.Timestamp":
            return st.just(timestamp(1_700_000_000, 0))
        if full_name == "google.protobuf.Struct":
            return st.just({"key": "value"})
        if full_name != "google.protobuf.FieldMask":
            return valid_fields(field.message_type, seed)
    if name in ACTING_USER_FIELDS:
        return st.just(USER)
    if name in OTHER_USER_FIELDS:
        return st.just(OTHER_USER)
    if name in ("user_ids", "other_user_ids"):
        return st.lists(st.sampled_from([USER, OTHER_USER]), max_size=3)
    if name.endswith("entry_id"):
        return st.just(seed.entry_id)
    if name == "entry_ids":
        return st.lists(st.just(seed.entry_id), max_size=2)
    if name == "memory_id":
        return st.just(seed.memory_id)
    if name == "pending_transfer_id":
        return st.just(seed.pending_transfer_id)
    if name == "operations":  # SubmitOperations: one operation of each kind that needs no seed
        return st.just([{"request_id": "op1", "credit": {"user_id": USER, "amount": 1}},
                        {"request_id": "op2", "transfer": {"from_user_id": USER, "to_user_id": OTHER_USER, "amount": 1}}])
    if name == "embedding":
        return st.just(GOOD_EMBEDDING)
    if name in ("page_token", "resume_token"):
        return st.just("")  # the first page; odd_value has the rest
    if name == "update_mask":
        return st.builds(lambda paths: {"paths": paths}, st.lists(st.sampled_from(UPDATABLE_FIELDS), min_size=1, max_size=4))
    if name in ("request_id", "session_id", "thread_id", "pattern_type", "event", "action", "type", "emotion_type"):
        return st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
    if name == "content":
        return st.just("something that happened")
    if name in ("gravity_score", "min_gravity", "intensity"):
        return st.sampled_from(TINY_FLOATS) | st.floats(0, 1)
    if name in ("recency_weight", "gravity_weight"):  # at most 1 together
        return st.sampled_from(TINY_FLOATS) | st.floats(0, 0.5)
    if name == "amount":
        return st.integers(1, 1000)
    return None


def odd_value(field: descriptor.FieldDescriptor, seed: Seed, depth: int) -> st.SearchStrategy[Any]:
    """Any value of the field's type, the odder the better."""
    kind = field.type
    if kind == descriptor.FieldDescriptor.TYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name == "google.protobuf.Timestamp":
            return TIMESTAMPS
        if full_name == "google.protobuf.Struct":
            return STRUCTS
        if full_name == "google.protobuf.FieldMask":
            paths = st.sampled_from(UPDATABLE_FIELDS) | ODD_STRINGS | st.text(max_size=20)
            return st.builds(lambda p: {"paths": p}, st.lists(paths, max_size=5))
        return message_fields(field.message_type, seed, depth + 1)
    if kind == descriptor.FieldDescriptor.TYPE_STRING:
        return (odd_page_tokens(seed) if field.name.endswith("token") else ODD_STRINGS) | st.text(max_size=100)
    if kind == descriptor.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == descriptor.FieldDescriptor.TYPE_DOUBLE:
        return doubles()
    if kind == descriptor.FieldDescriptor.TYPE_FLOAT:
        return doubles(32)
    if kind == descriptor.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from([*known, -1, 99, 2**31 - 1, -(2**31)]) | st.integers(-(2**31), 2**31 - 1)
    return integers(field)


def field_value(field: descriptor.FieldDescriptor, seed: Seed, depth: int) -> st.SearchStrategy[Any]:
    valid = valid_value(field, seed)
    odd = odd_value(field, seed, depth)
    if field.is_repeated:
        lists = st.lists(odd, max_size=5) | st.builds(lambda v, n: [v] * n, odd, st.sampled_from([33, 65, 385, 1001]))
        if field.name == "embedding":
            lists |= st.builds(lambda v: [v] * DIM, odd)  # the right length, odd values
        odd = lists
    return odd if valid is None else valid | odd


def message_fields(message_type: descriptor.Descriptor, seed: Seed, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the message's fields, each a valid or an odd value (as a dict, built by build())."""
    if depth > 1:
        return st.just({})
    return st.fixed_dictionaries({}, optional={f.name: field_value(f, seed, depth) for f in message_type.fields})


def build(message: Message, fields: dict[str, Any]) -> Message:
    """Sets the generated fields on a message (ValueError: protobuf refuses the value, e.g. a surrogate)."""
    for name, value in fields.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.message_type is None:
            if field.is_repeated:
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        elif field.message_type.full_name == "google.protobuf.Struct":
            getattr(message, name).update(value)
        elif field.is_repeated:
            for item in value:
                build(getattr(message, name).add(), item)
        else:
            build(getattr(message, name), value)
    return message


# ------------------------------------------------------------------ the harness


@pytest.fixture(scope="module")
async def fuzz_target(
    shared: tuple[Clients, asyncpg.Connection],
) -> AsyncIterator[tuple[Clients, asyncpg.Connection, Seed, str]]:
    """The shared server, the fuzzer's seeded things, and a query checksumming every table."""
    clients, db = shared
    api = clients.interactions
    entry = (await api.CreateEntry(interaction_pb2.CreateEntryRequest(author_id=USER, type="post"), metadata=SERVICE)).entry
    memory = (
        await clients.memories.CreateMemory(
            memory_pb2.CreateMemoryRequest(user_id=USER, content="seed", embedding=GOOD_EMBEDDING), metadata=SERVICE
        )
    ).memory
    tiny = await clients.memories.CreateMemory(
        memory_pb2.CreateMemoryRequest(user_id=USER, content="tiny", gravity_score=1e-200, embedding=GOOD_EMBEDDING),
        metadata=SERVICE,
    )
    # A subnormal gravity, as stored before the service normalised them.
    await db.execute("UPDATE memories SET gravity_score = 5e-324 WHERE memory_id = $1", uuid.UUID(tiny.memory.memory_id))
    for i in range(2):
        await api.RecordInteraction(
            interaction_pb2.RecordInteractionRequest(user_id=USER, target_id=f"t{i}", action="saved"), metadata=SERVICE
        )
        await clients.tokens.Credit(token_pb2.CreditRequest(user_id=USER, amount=10, request_id=f"seed{i}"), metadata=SERVICE)
    interactions = await api.ListInteractions(
        interaction_pb2.ListInteractionsRequest(user_id=USER, page_size=1), metadata=SERVICE
    )
    transactions = await clients.tokens.ListTransactions(
        token_pb2.ListTransactionsRequest(user_id=USER, page_size=1), metadata=SERVICE
    )
    tokens = (interactions.next_page_token, transactions.next_page_token)  # real tokens, for other lists
    assert all(tokens)
    pending = await clients.tokens.CreatePendingTransfer(
        token_pb2.CreatePendingTransferRequest(from_user_id=USER, to_user_id=OTHER_USER, amount=1, request_id="seed"),
        metadata=SERVICE,
    )
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' AND table_name <> 'maintenance_runs' ORDER BY 1"
    )
    # Per table: its row count and the sum of its rows' hashes (any insert, update or delete changes them).
    # A refused ledger request keeps its refusal (token_requests with an error_code), which is not a write
    # of what it asked for.
    checksum = "SELECT ARRAY[" + ", ".join(
        f"(SELECT ARRAY[count(*), coalesce(sum(hashtext(t::text)), 0)] FROM \"{r['table_name']}\" t"
        + (" WHERE t.error_code IS NULL" if r["table_name"] == "token_requests" else "") + ")"
        for r in tables
    ) + "]"
    seed = Seed(entry.entry_id, memory.memory_id, pending.pending_transfer.pending_transfer_id, tokens)
    yield clients, db, seed, checksum


async def outcome(
    clients: Clients, method: descriptor.MethodDescriptor, data: bytes, metadata: Any
) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None, Message | None]:
    """The call's code, its error, and its response (None for a stream). A
    stream that starts (sends its initial metadata and is still open) counts as
    OK and is cancelled. The request goes as the bytes given."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.server_streaming:
        call = clients.channel.unary_stream(path)(data, metadata=metadata, timeout=30)
    else:
        call = clients.channel.unary_unary(path)(data, metadata=metadata, timeout=30)
    try:
        if method.server_streaming:
            await call.initial_metadata()
            if not call.done():
                return grpc.StatusCode.OK, None, None
            await call.read()  # raises the status it ended with
            return grpc.StatusCode.OK, None, None
        response = message_factory.GetMessageClass(method.output_type).FromString(await call)
        return grpc.StatusCode.OK, None, response
    except grpc.aio.AioRpcError as error:
        return error.code(), error, None
    finally:
        call.cancel()


def nan_fields(message: Message) -> list[str]:
    """The fields of a message (nested ones too) that hold a NaN."""
    found = []
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if isinstance(item, Message):
                found += nan_fields(item)
            elif isinstance(item, float) and math.isnan(item):
                found.append(field.name)
    return found


async def check_call(
    target: tuple[Clients, asyncpg.Connection, Seed, str], method: descriptor.MethodDescriptor, data: bytes, caller: str
) -> None:
    """The properties every call keeps, whatever it is sent."""
    clients, db, _, checksum = target
    metadata = {"user": auth(USER), "service": SERVICE, "other": auth(OTHER_USER)}[caller]
    before = await db.fetchval(checksum)
    code, error, response = await outcome(clients, method, data, metadata)

    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error and error.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert error is not None
        named = bad_request_fields(error)
        # "" is a request that cannot be decoded at all: no one field is at fault.
        fields = {*method.input_type.fields_by_name, ""}
        assert named and all(re.split(r"[.\[]", f)[0] in fields for f in named), f"BadRequest names {named}: {error.details()}"
    if code != grpc.StatusCode.OK:
        assert await db.fetchval(checksum) == before, f"{code.name} but something was written"
    if response is not None:
        assert not nan_fields(response), response


CALLERS = st.sampled_from(["user", "user", "service", "other"])


@pytest.mark.parametrize("method", RPCS)
@FUZZ
@given(data=st.data())
async def test_odd_input_is_never_internal_and_a_failure_writes_nothing(
    fuzz_target: Any, method: descriptor.MethodDescriptor, data: st.DataObject
) -> None:
    request_type = message_factory.GetMessageClass(method.input_type)
    fields = data.draw(message_fields(method.input_type, fuzz_target[2]), label="fields")
    try:
        request = build(request_type(), fields)
    except (ValueError, TypeError):  # not representable in protobuf: a client cannot send it
        assume(False)
    await check_call(fuzz_target, method, request.SerializeToString(), data.draw(CALLERS, label="caller"))


@pytest.mark.parametrize("method", RPCS)
@settings(FUZZ, max_examples=max(FUZZ.max_examples // 5, 6))
@given(data=st.data())
async def test_any_bytes_are_never_internal_and_a_failure_writes_nothing(
    fuzz_target: Any, method: descriptor.MethodDescriptor, data: st.DataObject
) -> None:
    """Requests no protobuf library would encode: random bytes, and encodings of
    generated requests cut short or with one byte changed."""
    fields = data.draw(message_fields(method.input_type, fuzz_target[2]), label="fields")
    try:
        encoded = build(message_factory.GetMessageClass(method.input_type)(), fields).SerializeToString()
    except (ValueError, TypeError):
        encoded = b""
    position = data.draw(st.integers(0, max(len(encoded) - 1, 0)), label="position")
    raw = data.draw(
        st.binary(max_size=64)
        | st.just(encoded[:position])
        | st.builds(lambda b: encoded[:position] + bytes([b]) + encoded[position + 1 :], st.integers(0, 255)),
        label="bytes",
    )
    await check_call(fuzz_target, method, raw, data.draw(CALLERS, label="caller"))


@pytest.mark.parametrize("method", RPCS)
@settings(FUZZ, max_examples=3)
@given(data=st.data())
async def test_the_valid_values_pass_validation(
    fuzz_target: Any, method: descriptor.MethodDescriptor, data: st.DataObject
) -> None:
    """A request made only of the generated valid values is accepted, so the
    odd values mixed into them reach the code behind validation."""
    clients, _, seed, _ = fuzz_target
    fields = data.draw(valid_fields(method.input_type, seed))
    request = build(message_factory.GetMessageClass(method.input_type)(), fields)
    code, error, _ = await outcome(clients, method, request.SerializeToString(), SERVICE)
    accepted = (
        grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS
    )
    assert code in accepted, error and error.details()
