"""Authentication and authorization against a real server.

No or invalid token: UNAUTHENTICATED. A user token acting as someone else:
PERMISSION_DENIED, nothing written. A service token acts for anyone. Counts and
resonator lists are public for entries the caller may see. Health and
reflection need no token. RS256 tokens are accepted with a configured key.
Time claims get a configurable clock-skew leeway and must be numbers; an
operator may cap token lifetimes; a stream ends UNAUTHENTICATED when its token
expires.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus.config import from_sources
from nexus.server import NexusServer
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import memory_pb2 as mpb

from support.rpc import JWT_SECRET, SERVICE, Clients, auth, rpc_error, token
from support.servers import server_config
from test_validation import snapshot

ALICE, BOB = "alice", "bob"
OK = grpc.StatusCode.OK


def claims(sub: str = ALICE, ttl_s: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + ttl_s, **extra}


def bearer(jwt_token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {jwt_token}"),)


def hs256(payload: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token keyed with arbitrary bytes (PyJWT refuses PEM keys as HMAC secrets)."""
    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def with_payload(jwt_token: str, payload: dict[str, Any]) -> str:
    """The token with its payload replaced and its signature kept."""
    header, _, signature = jwt_token.split(".")
    return f"{header}.{b64(json.dumps(payload).encode())}.{signature}"


async def outcome(call: Any) -> grpc.StatusCode:
    """The status code a call ends with."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


@pytest.fixture
def clients(shared: tuple[Clients, asyncpg.Connection]) -> Clients:
    """This module's calls go to one shared server (HS256 only); each test uses fresh entries."""
    return shared[0]


@pytest.fixture
def db(shared: tuple[Clients, asyncpg.Connection]) -> asyncpg.Connection:
    return shared[1]


@pytest.fixture
async def entry(clients: Clients) -> str:
    """A public entry of alice's."""
    response = await clients.interactions.CreateEntry(pb.CreateEntryRequest(author_id=ALICE, type="post"), metadata=SERVICE)
    return response.entry.entry_id


# Every RPC, as a request naming entry e and acting (or viewing) as user u.
REQUESTS: dict[str, Callable[[str, str], Any]] = {
    "CreateEntry": lambda e, u: pb.CreateEntryRequest(author_id=u, type="post"),
    "CreateBranch": lambda e, u: pb.CreateBranchRequest(author_id=u, parent_entry_id=e, type="reply"),
    "DeleteEntry": lambda e, u: pb.DeleteEntryRequest(user_id=u, entry_id=e),
    "ToggleResonance": lambda e, u: pb.ToggleResonanceRequest(user_id=u, entry_id=e),
    "SetResonance": lambda e, u: pb.SetResonanceRequest(user_id=u, entry_id=e, resonated=True),
    "ToggleAmplification": lambda e, u: pb.ToggleAmplificationRequest(user_id=u, entry_id=e),
    "SetAmplification": lambda e, u: pb.SetAmplificationRequest(user_id=u, entry_id=e, amplified=True),
    "RecordShare": lambda e, u: pb.RecordShareRequest(user_id=u, entry_id=e, request_id=f"share-{e}"),
    "RecordInteraction": lambda e, u: pb.RecordInteractionRequest(user_id=u, target_id="grant:1", action="saved"),
    "GetUserInteractionStates": lambda e, u: pb.GetUserInteractionStatesRequest(user_id=u, entry_ids=[e]),
    "ListInteractions": lambda e, u: pb.ListInteractionsRequest(user_id=u),
    "GetEntries": lambda e, u: pb.GetEntriesRequest(entry_ids=[e], viewer_id=u),
    "GetBranchTree": lambda e, u: pb.GetBranchTreeRequest(root_entry_id=e, viewer_id=u),
    "GetInteractionCounts": lambda e, u: pb.GetInteractionCountsRequest(entry_ids=[e]),
    "ListResonators": lambda e, u: pb.ListResonatorsRequest(entry_id=e),
}
PUBLIC_READS = {"GetInteractionCounts", "ListResonators"}  # no acting user
ACTING_RPCS = [rpc for rpc in REQUESTS if rpc not in PUBLIC_READS]
READS = {"GetUserInteractionStates", "ListInteractions", "GetEntries", "GetBranchTree", *PUBLIC_READS}
ON_ONE_ENTRY = ["CreateBranch", "DeleteEntry", "ToggleResonance", "SetResonance", "ToggleAmplification",
                "SetAmplification", "RecordShare", "GetBranchTree", "ListResonators"]
BATCH_READS = {"GetEntries": "entries", "GetInteractionCounts": "counts", "GetUserInteractionStates": "states"}


def send(clients: Clients, rpc: str, entry: str, user: str, metadata: Any) -> Any:
    return getattr(clients.interactions, rpc)(REQUESTS[rpc](entry, user), metadata=metadata)


# ------------------------------------------------------------ UNAUTHENTICATED

BAD_CREDENTIALS: dict[str, tuple[tuple[str, str], ...]] = {
    "missing": (),
    "empty": (("authorization", ""),),
    "token_scheme": (("authorization", f"Token {token(ALICE)}"),),
    "basic_scheme": (("authorization", "Basic YWxpY2U6c2VjcmV0"),),
    "no_scheme": (("authorization", token(ALICE)),),
    "bearer_alone": (("authorization", "Bearer"),),
    "not_a_jwt": bearer("not-a-jwt"),
    "other_secret": bearer(hs256(claims(), "another-secret-" + "y" * 32)),
    "expired": bearer(hs256(claims(ttl_s=-60))),
    "not_yet_valid": bearer(hs256(claims(nbf=int(time.time()) + 3600))),
    "no_exp": bearer(hs256({"sub": ALICE, "iat": int(time.time())})),
    "no_sub": bearer(hs256({"exp": int(time.time()) + 3600})),
    "bad_sub": bearer(hs256(claims(sub="al ice"))),
    "alg_none": bearer(jwt.encode(claims(role="service"), None, algorithm="none")),
    "payload_swapped_to_service": bearer(with_payload(token(BOB), claims(sub=BOB, role="service"))),
}

@pytest.mark.parametrize("rpc", ["RecordInteraction", "ToggleResonance", "GetInteractionCounts"])
@pytest.mark.parametrize("credentials", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
async def test_no_valid_token_is_unauthenticated_and_writes_nothing(
    clients: Clients, db: asyncpg.Connection, entry: str, credentials: Any, rpc: str
) -> None:
    before = await snapshot(db)
    error = await rpc_error(send(clients, rpc, entry, ALICE, credentials))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert await snapshot(db) == before
    # The same call with a valid token goes through.
    await send(clients, rpc, entry, ALICE, auth(ALICE))


# ------------------------------------------------- acting as another user

@pytest.mark.parametrize("rpc", ACTING_RPCS)
async def test_user_token_acting_as_another_user_is_permission_denied(
    clients: Clients, db: asyncpg.Connection, entry: str, rpc: str
) -> None:
    before = await snapshot(db)
    error = await rpc_error(send(clients, rpc, entry, ALICE, auth(BOB)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert await snapshot(db) == before
    # Alice herself may.
    await send(clients, rpc, entry, ALICE, auth(ALICE))
    assert (await snapshot(db) == before) == (rpc in READS)


@pytest.mark.parametrize("rpc", ACTING_RPCS)
async def test_service_token_may_act_for_any_user(clients: Clients, db: asyncpg.Connection, entry: str, rpc: str) -> None:
    before = await snapshot(db)
    await send(clients, rpc, entry, ALICE, SERVICE)
    assert (await snapshot(db) == before) == (rpc in READS)


async def test_service_writes_land_on_the_named_user(clients: Clients, entry: str) -> None:
    api = clients.interactions
    created = await api.CreateEntry(pb.CreateEntryRequest(author_id=ALICE, type="post"), metadata=SERVICE)
    assert created.entry.author_id == ALICE
    await api.SetResonance(pb.SetResonanceRequest(user_id=ALICE, entry_id=entry, resonated=True), metadata=SERVICE)
    states = await api.GetUserInteractionStates(
        pb.GetUserInteractionStatesRequest(user_id=ALICE, entry_ids=[entry]), metadata=auth(ALICE)
    )
    assert [(s.entry_id, s.has_resonated) for s in states.states] == [(entry, True)]


async def test_only_the_author_may_delete_an_entry(clients: Clients, db: asyncpg.Connection, entry: str) -> None:
    before = await snapshot(db)
    error = await rpc_error(
        clients.interactions.DeleteEntry(pb.DeleteEntryRequest(user_id=BOB, entry_id=entry), metadata=auth(BOB))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert await snapshot(db) == before


@pytest.mark.parametrize("role", ["admin", "Service", "services", ["service"], True])
async def test_only_role_service_may_act_for_others(clients: Clients, db: asyncpg.Connection, role: Any) -> None:
    before = await snapshot(db)
    error = await rpc_error(send(clients, "RecordInteraction", "", ALICE, bearer(hs256(claims(sub=BOB, role=role)))))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert await snapshot(db) == before


# ----------------------------------------------------------- public reads


@pytest.mark.parametrize(
    ("caller", "sees_private"),
    [(auth(BOB), False), (auth(ALICE), True), (SERVICE, True)],
    ids=["other_user", "author", "service"],
)
async def test_counts_and_resonators_are_public_for_visible_entries(
    clients: Clients, caller: Any, sees_private: bool
) -> None:
    api = clients.interactions

    async def create(privacy: int, parent: str = "") -> str:
        fields = dict(author_id=ALICE, type="post", privacy=privacy)
        if parent:
            branch = pb.CreateBranchRequest(parent_entry_id=parent, **fields)
            return (await api.CreateBranch(branch, metadata=auth(ALICE))).entry.entry_id
        return (await api.CreateEntry(pb.CreateEntryRequest(**fields), metadata=auth(ALICE))).entry.entry_id

    public, private = await create(pb.PRIVACY_PUBLIC), await create(pb.PRIVACY_PRIVATE)
    private_reply = await create(pb.PRIVACY_PRIVATE, parent=public)
    for entry_id in (public, private):
        await api.SetResonance(pb.SetResonanceRequest(user_id=ALICE, entry_id=entry_id, resonated=True), metadata=auth(ALICE))

    counts = await api.GetInteractionCounts(pb.GetInteractionCountsRequest(entry_ids=[private, public]), metadata=caller)
    expected = [private, public] if sees_private else [public]
    assert [(c.entry_id, c.resonance_count) for c in counts.counts] == [(e, 1) for e in expected]
    entries = await api.GetEntries(pb.GetEntriesRequest(entry_ids=[private, public]), metadata=caller)
    assert [e.entry_id for e in entries.entries] == expected
    tree = await api.GetBranchTree(pb.GetBranchTreeRequest(root_entry_id=public), metadata=caller)
    assert [n.entry_id for n in tree.nodes] == ([public, private_reply] if sees_private else [public])

    resonators = await api.ListResonators(pb.ListResonatorsRequest(entry_id=public), metadata=caller)
    assert list(resonators.user_ids) == [ALICE]
    private_resonators = api.ListResonators(pb.ListResonatorsRequest(entry_id=private), metadata=caller)
    if sees_private:
        assert list((await private_resonators).user_ids) == [ALICE]
    else:
        assert (await rpc_error(private_resonators)).code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def private_entry(clients: Clients) -> str:
    request = pb.CreateEntryRequest(author_id=ALICE, type="post", privacy=pb.PRIVACY_PRIVATE)
    return (await clients.interactions.CreateEntry(request, metadata=auth(ALICE))).entry.entry_id


@pytest.mark.parametrize("rpc", ON_ONE_ENTRY)
async def test_private_entry_of_another_user_is_not_found(
    clients: Clients, db: asyncpg.Connection, private_entry: str, rpc: str
) -> None:
    before = await snapshot(db)
    error = await rpc_error(send(clients, rpc, private_entry, BOB, auth(BOB)))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert await snapshot(db) == before
    await send(clients, rpc, private_entry, ALICE, auth(ALICE))  # the author may


@pytest.mark.parametrize("rpc", BATCH_READS)
async def test_private_entry_of_another_user_is_absent_from_batch_reads(
    clients: Clients, private_entry: str, rpc: str
) -> None:
    field = BATCH_READS[rpc]
    assert len(getattr(await send(clients, rpc, private_entry, BOB, auth(BOB)), field)) == 0
    assert len(getattr(await send(clients, rpc, private_entry, ALICE, auth(ALICE)), field)) == 1


# ------------------------------------------------ health and reflection


@pytest.mark.parametrize("service", ["", "nexus.v1.InteractionService"])
async def test_health_check_needs_no_token(clients: Clients, service: str) -> None:
    response = await health_pb2_grpc.HealthStub(clients.channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_token(clients: Clients) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(clients.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nexus.v1.InteractionService"),
    ]
    listed, described = [response async for response in stub.ServerReflectionInfo(iter(requests))]
    services = {s.name for s in listed.list_services_response.service}
    assert {"nexus.v1.InteractionService", "grpc.health.v1.Health"} <= services
    assert described.file_descriptor_response.file_descriptor_proto


# ------------------------------------------------------------------ RS256


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_keys() -> dict[str, rsa.RSAPrivateKey]:
    return {"configured": new_rsa_key(), "other": new_rsa_key()}


@pytest.fixture
async def rs256_clients(db_url: str, tmp_path: Path, rsa_keys: dict[str, Any]) -> AsyncIterator[Clients]:
    """A second server that also accepts RS256 tokens of the configured key."""
    key_file = tmp_path / "jwt-public.pem"
    key_file.write_bytes(public_pem(rsa_keys["configured"]))
    nexus = NexusServer(server_config(db_url, jwt_public_key_file=str(key_file)))
    await nexus.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nexus.port}") as channel:
            yield Clients(channel)
    finally:
        await nexus.stop(grace=0)


RS256_TOKENS: dict[str, Callable[[dict[str, Any]], str]] = {
    "rs256_configured_key": lambda k: jwt.encode(claims(), k["configured"], algorithm="RS256"),
    "rs256_other_key": lambda k: jwt.encode(claims(), k["other"], algorithm="RS256"),
    "rs256_expired": lambda k: jwt.encode(claims(ttl_s=-60), k["configured"], algorithm="RS256"),
    "rs256_service": lambda k: jwt.encode(claims(sub="backend", role="service"), k["configured"], algorithm="RS256"),
    "hs256_secret": lambda k: hs256(claims()),
    "hs256_keyed_with_public_pem": lambda k: forge_hs256(claims(), public_pem(k["configured"])),
}


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
RS256_CASES = {  # token kind: (outcome on the server with the public key, on the HS256-only server)
    "rs256_configured_key": (OK, UNAUTHENTICATED),
    "rs256_other_key": (UNAUTHENTICATED, UNAUTHENTICATED),
    "rs256_expired": (UNAUTHENTICATED, UNAUTHENTICATED),
    "rs256_service": (OK, UNAUTHENTICATED),
    "hs256_secret": (OK, OK),
    "hs256_keyed_with_public_pem": (UNAUTHENTICATED, UNAUTHENTICATED),
}


@pytest.mark.parametrize(
    ("token_kind", "on_rs256_server", "on_hs256_server"),
    [(kind, *expected) for kind, expected in RS256_CASES.items()],
    ids=RS256_CASES.keys(),
)
async def test_rs256_tokens_are_accepted_only_with_the_configured_key(
    clients: Clients,
    rs256_clients: Clients,
    rsa_keys: dict[str, Any],
    token_kind: str,
    on_rs256_server: grpc.StatusCode,
    on_hs256_server: grpc.StatusCode,
) -> None:
    credentials = bearer(RS256_TOKENS[token_kind](rsa_keys))
    for server, expected in ((rs256_clients, on_rs256_server), (clients, on_hs256_server)):
        assert await outcome(send(server, "RecordInteraction", "", ALICE, credentials)) == expected


async def test_rs256_user_token_may_not_act_as_another_user(rs256_clients: Clients, rsa_keys: dict[str, Any]) -> None:
    credentials = bearer(jwt.encode(claims(sub=BOB), rsa_keys["configured"], algorithm="RS256"))
    error = await rpc_error(send(rs256_clients, "RecordInteraction", "", ALICE, credentials))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------- clock skew, lifetimes, streams

LEEWAY_S = 30  # the default jwt_leeway_s, which the shared server runs with


def relative(**offsets_s: int) -> Callable[[], dict[str, Any]]:
    """Claims built when the test runs (not when it is collected): alice's,
    with these time claims at now + offset seconds."""
    def build() -> dict[str, Any]:
        now = int(time.time())
        return {"sub": ALICE, "iat": now, "exp": now + 3600, **{k: now + v for k, v in offsets_s.items()}}

    return build


SKEWED = {
    "expired_within_leeway": relative(exp=-LEEWAY_S // 3),
    "not_before_within_leeway": relative(nbf=LEEWAY_S // 3),
    "issued_ahead_within_leeway": relative(iat=LEEWAY_S // 3),
}


@pytest.mark.parametrize("skewed", SKEWED.values(), ids=SKEWED.keys())
async def test_a_token_within_the_clock_skew_leeway_is_accepted(
    clients: Clients, skewed: Callable[[], dict[str, Any]]
) -> None:
    credentials = bearer(hs256(skewed()))
    assert await outcome(send(clients, "RecordInteraction", "", ALICE, credentials)) == OK


YEAR_2100 = 4_102_444_800  # far enough ahead that only the type can make these fail
NOT_NUMBERS: dict[str, dict[str, Any]] = {
    "exp_numeric_string": {"exp": str(YEAR_2100)},
    "exp_float_string": {"exp": f"{YEAR_2100}.5"},
    "exp_bool": {"exp": True},
    "exp_list": {"exp": [YEAR_2100]},
    "iat_string": {"iat": "1700000000"},
    "nbf_string": {"nbf": "1700000000"},
}


@pytest.mark.parametrize("claim", NOT_NUMBERS.values(), ids=NOT_NUMBERS.keys())
async def test_time_claims_must_be_numbers(clients: Clients, db: asyncpg.Connection, claim: dict[str, Any]) -> None:
    before = await snapshot(db)
    error = await rpc_error(send(clients, "RecordInteraction", "", ALICE, bearer(hs256({**claims(), **claim}))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert await snapshot(db) == before


STRICT_LEEWAY_S = 1
MAX_LIFETIME_S = 3600


@pytest.fixture
async def strict_clients(db_url: str) -> AsyncIterator[Clients]:
    """A server with a 1 s leeway and tokens capped at an hour."""
    config = server_config(db_url, jwt_leeway_s=STRICT_LEEWAY_S, jwt_max_lifetime_s=MAX_LIFETIME_S)
    nexus = NexusServer(config)
    await nexus.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nexus.port}") as channel:
            yield Clients(channel)
    finally:
        await nexus.stop(grace=0)


def without_iat(claims_of: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    return lambda: {k: v for k, v in claims_of().items() if k != "iat"}


STRICT_CASES = {  # token: (outcome on the strict server, on the default one: 30 s leeway, no cap)
    "lifetime_at_the_cap": (relative(exp=MAX_LIFETIME_S), OK, OK),
    "lifetime_over_the_cap": (relative(exp=MAX_LIFETIME_S + 60), UNAUTHENTICATED, OK),
    "lifetime_unknown_without_iat": (without_iat(relative(exp=60)), UNAUTHENTICATED, OK),
    "expired_beyond_the_smaller_leeway": (relative(exp=-LEEWAY_S // 3), UNAUTHENTICATED, OK),
    "issued_in_the_future_beyond_both": (relative(iat=4 * LEEWAY_S), UNAUTHENTICATED, UNAUTHENTICATED),
}


@pytest.mark.parametrize(("payload", "on_strict", "on_default"), STRICT_CASES.values(), ids=STRICT_CASES.keys())
async def test_leeway_and_lifetime_cap_are_configurable(
    clients: Clients,
    strict_clients: Clients,
    payload: Callable[[], dict[str, Any]],
    on_strict: grpc.StatusCode,
    on_default: grpc.StatusCode,
) -> None:
    credentials = bearer(hs256(payload()))
    assert await outcome(send(strict_clients, "RecordInteraction", "", ALICE, credentials)) == on_strict
    assert await outcome(send(clients, "RecordInteraction", "", ALICE, credentials)) == on_default


async def test_a_stream_ends_unauthenticated_when_its_token_expires(strict_clients: Clients) -> None:
    """A stream opened with a 3 s token delivers while the token is valid, then
    ends with UNAUTHENTICATED (not before exp + leeway); the same token, cached
    by the server, is refused for new calls from then on."""

    expires = int(time.time()) + 3
    credentials = bearer(hs256({"sub": ALICE, "iat": int(time.time()), "exp": expires}))
    memories = strict_clients.memories
    call = memories.SubscribeMemories(mpb.SubscribeMemoriesRequest(user_id=ALICE), metadata=credentials)
    await asyncio.wait_for(call.initial_metadata(), 10)
    await memories.CreateMemory(mpb.CreateMemoryRequest(user_id=ALICE, content="while valid"), metadata=credentials)
    event = await asyncio.wait_for(call.read(), 10)
    assert event.memory.content == "while valid"

    error = await asyncio.wait_for(rpc_error(call.read()), expires + STRICT_LEEWAY_S + 10 - time.time())
    ended = time.time()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert "expired" in error.details()
    assert ended >= expires + STRICT_LEEWAY_S - 0.05, ended - expires
    late = memories.CreateMemory(mpb.CreateMemoryRequest(user_id=ALICE, content="too late"), metadata=credentials)
    assert (await rpc_error(late)).code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("environ", "valid"),
    [
        ({"NEXUS_JWT_LEEWAY_S": "0", "NEXUS_JWT_MAX_LIFETIME_S": "900"}, True),
        ({"NEXUS_JWT_LEEWAY_S": "-1"}, False),
        ({"NEXUS_JWT_LEEWAY_S": "301"}, False),
        ({"NEXUS_JWT_MAX_LIFETIME_S": "-60"}, False),
    ],
)
def test_jwt_time_settings_are_validated(environ: dict[str, str], valid: bool) -> None:
    if valid:
        config = from_sources(environ=environ)
        assert (config.jwt_leeway_s, config.jwt_max_lifetime_s) == (0.0, 900.0)
    else:
        with pytest.raises(ValueError, match="jwt_"):
            from_sources(environ=environ)
