"""Prometheus metrics, scraped from the real /metrics endpoint after real calls.

Names and labels are go-grpc-prometheus's, so stock gRPC dashboards work:
started / handled (by grpc_code) / unary latency / message counters; streams
get their own duration histogram and an open-streams gauge. The registry is
process-wide (other tests' calls count too), so every check is a difference
between two scrapes around this test's own calls.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from nexus.server import NexusServer
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import memory_pb2 as mpb
from nexus.v1 import token_pb2 as tpb

from support.rpc import SERVICE, Clients, auth, rpc_error
from support.servers import server_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
WAIT_S = 10.0
INTERACTIONS = "nexus.v1.InteractionService"
MEMORIES = "nexus.v1.MemoryService"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def metrics(db_url: str) -> AsyncIterator[tuple[Clients, Callable[[], Awaitable[Samples]]]]:
    """A server serving /metrics, a client, and a scrape of its endpoint."""
    port = free_port()
    server = NexusServer(server_config(db_url, metrics_port=port))
    await server.start()

    def scrape_blocking() -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def scrape() -> Samples:
        return await asyncio.to_thread(scrape_blocking)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Clients(channel), scrape
    finally:
        await server.stop(grace=0)


def key(name: str, grpc_type: str, service: str, method: str, **extra: str) -> tuple[str, frozenset[tuple[str, str]]]:
    labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method, **extra}
    return name, frozenset(labels.items())


def delta(before: Samples, after: Samples, sample: tuple[str, frozenset[tuple[str, str]]]) -> float:
    return after.get(sample, 0.0) - before.get(sample, 0.0)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not (result := await probe()):
        if loop.time() > deadline:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {what}")
        await asyncio.sleep(0.05)
    return result


async def test_unary_calls_are_counted_by_code_with_latency_and_messages(metrics: Any) -> None:
    clients, scrape = metrics
    before = await scrape()
    for _ in range(2):
        await clients.interactions.CreateEntry(pb.CreateEntryRequest(author_id="alice", type="post"), metadata=SERVICE)
    bad = pb.GetEntriesRequest(entry_ids=["not-a-uuid"])
    assert (await rpc_error(clients.interactions.GetEntries(bad, metadata=SERVICE))).code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await scrape()

    create = ("unary", INTERACTIONS, "CreateEntry")
    get = ("unary", INTERACTIONS, "GetEntries")
    assert delta(before, after, key("grpc_server_started_total", *create)) == 2
    assert delta(before, after, key("grpc_server_handled_total", *create, grpc_code="OK")) == 2
    assert delta(before, after, key("grpc_server_handling_seconds_count", *create)) == 2
    assert delta(before, after, key("grpc_server_handling_seconds_bucket", *create, le="+Inf")) == 2
    assert delta(before, after, key("grpc_server_msg_received_total", *create)) == 2
    assert delta(before, after, key("grpc_server_msg_sent_total", *create)) == 2
    assert delta(before, after, key("grpc_server_handled_total", *get, grpc_code="INVALID_ARGUMENT")) == 1
    assert delta(before, after, key("grpc_server_handled_total", *get, grpc_code="OK")) == 0
    assert delta(before, after, key("grpc_server_msg_sent_total", *get)) == 0  # an error sends no message
    assert after[("nexus_db_pool_connections", frozenset())] >= 1


async def test_group_commit_batches_are_observed_by_their_items(metrics: Any) -> None:
    clients, scrape = metrics
    entries = [
        (await clients.interactions.CreateEntry(pb.CreateEntryRequest(author_id="alice", type="post"), metadata=SERVICE)).entry
        for _ in range(10)
    ]
    before = await scrape()
    toggles = [pb.ToggleResonanceRequest(user_id=f"fan-{i}", entry_id=entries[i % 10].entry_id) for i in range(200)]
    await asyncio.gather(*(clients.interactions.ToggleResonance(t, metadata=SERVICE) for t in toggles))
    after = await scrape()

    items = ("nexus_group_commit_batch_items_sum", frozenset({("function", "apply_reactions")}))
    batches = ("nexus_group_commit_batch_items_count", frozenset({("function", "apply_reactions")}))
    assert delta(before, after, items) == 200
    assert 1 <= delta(before, after, batches) < 200, "200 concurrent toggles were not coalesced"


@pytest.mark.cluster
async def test_payments_to_one_payee_are_coalesced(metrics: Any) -> None:
    """On Citus too, where every item of a batch has the batch's route key: payments
    from many payers to one merchant go out routed by the merchant, many to a batch
    (each batch one two-phase commit), not one batch per payer. How many go
    together depends on how the calls arrive (a busy machine spreads them)."""
    clients, scrape = metrics
    payers = [f"payer-{i}" for i in range(200)]
    await asyncio.gather(*(
        clients.tokens.Credit(tpb.CreditRequest(user_id=p, amount=5, request_id=f"fund-{p}"), metadata=SERVICE)
        for p in payers
    ))  # fmt: skip
    before = await scrape()
    responses = await asyncio.gather(*(
        clients.tokens.Transfer(
            tpb.TransferRequest(from_user_id=p, to_user_id="merchant", amount=2, request_id=f"pay-{p}"), metadata=SERVICE
        )
        for p in payers
    ))  # fmt: skip
    after = await scrape()

    assert sorted(r.to_balance for r in responses) == list(range(2, 401, 2))
    items = ("nexus_group_commit_batch_items_sum", frozenset({("function", "apply_token_operations")}))
    batches = ("nexus_group_commit_batch_items_count", frozenset({("function", "apply_token_operations")}))
    assert delta(before, after, items) == 200
    # Routed by payer, each payment is a batch of its own: exactly 200.
    assert 1 <= delta(before, after, batches) < 200, "200 concurrent payments to one payee were not coalesced"


async def test_a_health_check_of_an_unknown_service_is_counted_as_not_found(metrics: Any) -> None:
    clients, scrape = metrics
    before = await scrape()
    health = health_pb2_grpc.HealthStub(clients.channel)
    error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    after = await scrape()

    check = ("unary", "grpc.health.v1.Health", "Check")
    assert delta(before, after, key("grpc_server_handled_total", *check, grpc_code="NOT_FOUND")) == 1
    assert delta(before, after, key("grpc_server_handled_total", *check, grpc_code="UNKNOWN")) == 0


async def test_a_stream_counts_its_messages_and_its_lifetime_apart_from_unary_latency(metrics: Any) -> None:
    clients, scrape = metrics
    subscribe = ("server_stream", MEMORIES, "SubscribeMemories")
    before = await scrape()

    call = clients.memories.SubscribeMemories(mpb.SubscribeMemoriesRequest(user_id="alice"), metadata=auth("alice"))
    await asyncio.wait_for(call.initial_metadata(), WAIT_S)
    while_open = await scrape()
    assert delta(before, while_open, key("nexus_streams_open", *subscribe)) == 1
    assert delta(before, while_open, key("grpc_server_started_total", *subscribe)) == 1

    for n in range(3):
        request = mpb.CreateMemoryRequest(user_id="alice", content=f"memory {n}")
        await clients.memories.CreateMemory(request, metadata=auth("alice"))
    events = [await asyncio.wait_for(call.read(), WAIT_S) for _ in range(3)]
    assert [e.memory.content for e in events] == ["memory 0", "memory 1", "memory 2"]
    call.cancel()

    async def stream_ended() -> Samples | None:
        now = await scrape()
        return now if delta(before, now, key("grpc_server_handled_total", *subscribe, grpc_code="CANCELLED")) else None

    after = await eventually(stream_ended, "the cancelled stream to be counted")
    assert delta(before, after, key("nexus_streams_open", *subscribe)) == 0
    assert delta(before, after, key("grpc_server_msg_received_total", *subscribe)) == 1
    assert delta(before, after, key("grpc_server_msg_sent_total", *subscribe)) == 3
    assert delta(before, after, key("nexus_stream_duration_seconds_count", *subscribe)) == 1
    assert key("grpc_server_handling_seconds_count", *subscribe) not in after
