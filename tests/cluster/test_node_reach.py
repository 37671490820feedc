"""Which workers each RPC reaches on a real Citus cluster (#19).

Every RPC of the four services is called once through a real NexusServer on a
cluster database whose every session logs the statements it sends to another
node (``citus.log_remote_commands``, with ``log_min_messages = notice`` so they
land in each node's server log, the delegated calls' own statements on the
worker included). The ports named by the lines a call added to the logs are
the workers it reached. Each RPC is checked against its class in ``REACH``,
and docs/citus.md's lists against ``REACH``:

- ``keys`` — the workers owning the call's keys, and no other: every key on
  one worker (worker A) but the second user of Transfer, Follow, Unfollow and
  the pending transfers (on worker B), and a branch and a pending transfer,
  placed by their own random ids;
- ``every`` — a fan-out read, the only kind that reaches every worker;
- ``none`` — no worker (a NOTIFY on the coordinator, a stream of broadcasts).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from devtools.citus_cluster import cluster_nodes, create_cluster_database, drop_cluster_database
from nexus import database, distribution, migrations
from nexus.server import NexusServer
from nexus.v1 import (
    follow_pb2,
    follow_pb2_grpc,
    interaction_pb2,
    interaction_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)

from support.databases import users_on_both_workers, worker_of
from support.rpc import SERVICE
from support.servers import server_config

ROOT = Path(__file__).resolve().parents[2]

# Each RPC's class (see the module docstring); docs/citus.md lists the same.
REACH: dict[str, str] = {
    "PublishBroadcast": "none", "SubscribeBroadcasts": "none",
    "Credit": "keys", "Deduct": "keys", "GetBalances": "keys", "ListTransactions": "keys",
    "Transfer": "keys", "CreatePendingTransfer": "keys", "PostPendingTransfer": "keys",
    "VoidPendingTransfer": "keys", "SetAccountPolicy": "keys", "SubmitOperations": "keys", "Follow": "keys", "Unfollow": "keys",
    "GetFollowCounts": "keys", "GetFollowStates": "keys", "ListFollowing": "keys", "ListFollowers": "every",
    "CreateEntry": "keys", "CreateBranch": "keys", "GetEntries": "keys", "DeleteEntry": "keys",
    "ToggleResonance": "keys", "SetResonance": "keys", "ToggleAmplification": "keys", "SetAmplification": "keys",
    "RecordShare": "keys", "GetBranchTree": "every", "GetInteractionCounts": "keys",
    "GetUserInteractionStates": "keys", "ListResonators": "keys", "RecordInteraction": "keys",
    "ListInteractions": "keys", "ListHomeFeed": "keys",
    "CreateMemory": "keys", "GetMemory": "keys", "UpdateMemory": "keys", "DeleteMemory": "keys",
    "ListMemories": "keys", "SearchMemories": "keys", "ListArcs": "keys", "SetIdentityEntities": "keys",
    "SubscribeMemories": "keys", "SubscribeArcs": "keys", "TouchSession": "keys", "ListSessions": "keys",
    "RecordPattern": "keys", "ListPatterns": "keys",
}

# Statements Citus's own background work sends (deadlock detection, recovery of
# prepared transactions), which may fall inside a call's window.
CITUS_BACKGROUND = re.compile(r"dump_local_wait_edges|pg_prepared_xacts|citus_internal|get_all_active_transactions")
ISSUED = re.compile(r"NOTICE:  issuing (.*?)\n[^\n]*DETAIL:  on server \S+?:(\d+) connectionId", re.DOTALL)


class NodeLogs:
    """The server logs of the cluster's nodes, read from where a call began."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._offsets = [0] * len(paths)

    def mark(self) -> None:
        self._offsets = [path.stat().st_size for path in self._paths]

    def reached(self) -> set[int]:
        ports: set[int] = set()
        for path, offset in zip(self._paths, self._offsets, strict=True):
            with path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            ports |= {int(port) for statement, port in ISSUED.findall(text) if not CITUS_BACKGROUND.search(statement)}
        return ports


@dataclass
class Cluster:
    url: str
    a: int  # the worker that owns every key but the second of a two-key call
    b: int
    workers: set[int]
    logs: NodeLogs


@pytest.fixture
async def cluster(citus_url: str) -> AsyncIterator[Cluster]:
    name = f"nexus_reach_{os.getpid()}"
    url = await create_cluster_database(citus_url, name)
    try:
        conn = await database.connect(url)
        try:
            await migrations.migrate(conn)
            _, workers = await cluster_nodes(url)
            paths = []
            for node_url in [url, *(distribution.node_url(url, host, port, name) for host, port in workers)]:
                node = await asyncpg.connect(node_url)
                try:
                    paths.append(Path(await node.fetchval("SHOW data_directory")) / "server.log")
                finally:
                    await node.close()
            if not all(path.is_file() for path in paths):
                pytest.skip(f"the nodes' server logs are not readable here: {paths}")
            # Every later session of this database logs what it sends to other nodes, in its node's log.
            await conn.execute(f'ALTER DATABASE "{name}" SET citus.log_remote_commands = on')
            await conn.execute(f'ALTER DATABASE "{name}" SET log_min_messages = notice')
            a, b = sorted(port for _, port in workers)[:2]
        finally:
            await conn.close()
        yield Cluster(url, a, b, {port for _, port in workers}, NodeLogs(paths))
    finally:
        await drop_cluster_database(citus_url, name)


BATCH_READS = {"GetEntries", "GetInteractionCounts", "GetUserInteractionStates"}


async def test_every_rpc_reaches_only_the_workers_of_its_keys(cluster: Cluster) -> None:
    conn = await database.connect(cluster.url)
    # No maintenance nor expiry sweep (which reads every worker) inside a call's window.
    nexus = NexusServer(server_config(cluster.url, maintenance_interval_s=3600, pending_expiry_interval_s=3600))
    await nexus.start()
    # Per RPC: the workers its call reached, and those owning its keys.
    checked: dict[str, tuple[set[int], set[int]]] = {}
    try:
        by_worker = await users_on_both_workers(conn, "reach", 2)
        user, friend = by_worker[cluster.a]
        stranger = by_worker[cluster.b][0]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nexus.port}") as channel:
            interactions = interaction_pb2_grpc.InteractionServiceStub(channel)
            follows = follow_pb2_grpc.FollowServiceStub(channel)
            tokens = token_pb2_grpc.TokenServiceStub(channel)
            memories = memory_pb2_grpc.MemoryServiceStub(channel)

            async def call(
                rpc: str, request: Awaitable[Any] | Callable[[], Awaitable[Any]], owners: set[int] | None = None
            ) -> Any:
                cluster.logs.mark()
                reply = await (request() if callable(request) else request)
                checked[rpc] = (cluster.logs.reached(), {cluster.a} if owners is None else owners)
                return reply

            async def stream(rpc: str, opened: Any) -> None:
                async def registered() -> None:
                    await opened.initial_metadata()  # the stream has read its position
                    opened.cancel()

                await call(rpc, registered)

            await call("PublishBroadcast", memories.PublishBroadcast(
                memory_pb2.PublishBroadcastRequest(user_id=user, event="ping"), metadata=SERVICE))
            await stream("SubscribeBroadcasts", memories.SubscribeBroadcasts(
                memory_pb2.SubscribeBroadcastsRequest(user_id=user), metadata=SERVICE))

            # Entries are placed by their random id: keep two that landed on worker A.
            entries: list[str] = []
            while len(entries) < 2:
                reply = await call("CreateEntry", interactions.CreateEntry(
                    interaction_pb2.CreateEntryRequest(author_id=user, type="post", content="hello"), metadata=SERVICE))
                entry = reply.entry.entry_id
                placed = await worker_of(conn, entry, "entries")
                # The entry's worker, and the author's (its feed activity; no follower to copy it to).
                checked["CreateEntry"] = (checked["CreateEntry"][0], {placed, cluster.a})
                if placed == cluster.a:
                    entries.append(entry)
            entry, other = entries

            reply = await call("CreateBranch", interactions.CreateBranch(interaction_pb2.CreateBranchRequest(
                author_id=user, parent_entry_id=entry, type="reply"), metadata=SERVICE))
            branch = await worker_of(conn, reply.entry.entry_id, "entries")
            checked["CreateBranch"] = (checked["CreateBranch"][0], {cluster.a, branch})  # parent and child

            for rpc, request in [
                ("ToggleResonance", interaction_pb2.ToggleResonanceRequest(user_id=user, entry_id=entry)),
                ("SetResonance", interaction_pb2.SetResonanceRequest(user_id=friend, entry_id=entry, resonated=True)),
                ("ToggleAmplification", interaction_pb2.ToggleAmplificationRequest(user_id=user, entry_id=entry)),
                ("SetAmplification",
                 interaction_pb2.SetAmplificationRequest(user_id=friend, entry_id=entry, amplified=True)),
                ("RecordShare", interaction_pb2.RecordShareRequest(user_id=user, entry_id=entry, request_id="s1")),
                ("GetEntries", interaction_pb2.GetEntriesRequest(entry_ids=[entry, other], viewer_id=user)),
                ("GetInteractionCounts", interaction_pb2.GetInteractionCountsRequest(entry_ids=[entry, other])),
                ("GetUserInteractionStates",
                 interaction_pb2.GetUserInteractionStatesRequest(user_id=user, entry_ids=[entry, other])),
                ("ListResonators", interaction_pb2.ListResonatorsRequest(entry_id=entry)),
                ("GetBranchTree", interaction_pb2.GetBranchTreeRequest(root_entry_id=entry)),
                ("RecordInteraction",
                 interaction_pb2.RecordInteractionRequest(user_id=user, target_id="grant:1", action="saved")),
                ("ListInteractions", interaction_pb2.ListInteractionsRequest(user_id=user)),
            ]:
                if rpc in BATCH_READS:
                    # Past the five calls after which PostgreSQL may cache a generic plan, which
                    # reads every shard (sequential calls reuse the pool's last connection).
                    for _ in range(6):
                        await getattr(interactions, rpc)(request, metadata=SERVICE)
                await call(rpc, getattr(interactions, rpc)(request, metadata=SERVICE))
            # The viewer follows a broadcaster of the other worker, whose newest post landed on the viewer's.
            star = by_worker[cluster.b][1]
            await conn.execute("INSERT INTO feed_actors (user_id, broadcast) VALUES ($1, true)", star)
            await follows.Follow(follow_pb2.FollowRequest(follower_id=user, followed_id=star), metadata=SERVICE)
            while True:
                reply = await interactions.CreateEntry(
                    interaction_pb2.CreateEntryRequest(author_id=star, type="post", content="hi"), metadata=SERVICE)
                starred = reply.entry.entry_id
                if await worker_of(conn, starred, "entries") == cluster.a:
                    break
                await interactions.DeleteEntry(
                    interaction_pb2.DeleteEntryRequest(user_id=star, entry_id=starred), metadata=SERVICE)
            # The viewer's feed: the viewer's worker, and those of the entries it shows.
            page = await call("ListHomeFeed", interactions.ListHomeFeed(
                interaction_pb2.ListHomeFeedRequest(viewer_id=user), metadata=SERVICE))
            shown = {await worker_of(conn, item.entry.entry_id, "entries") for item in page.items}
            assert {entry, starred} <= {item.entry.entry_id for item in page.items}
            checked["ListHomeFeed"] = (checked["ListHomeFeed"][0], {cluster.a} | shown)
            # A page of the broadcaster's post alone reaches the viewer's worker only: the broadcasters'
            # activities are read there (broadcast_activities, held by every node), not on their worker.
            page = await call("ListHomeFeed (second)", interactions.ListHomeFeed(
                interaction_pb2.ListHomeFeedRequest(viewer_id=user, page_size=1), metadata=SERVICE))
            assert [item.entry.entry_id for item in page.items] == [starred]
            await call("DeleteEntry", interactions.DeleteEntry(
                interaction_pb2.DeleteEntryRequest(user_id=user, entry_id=other), metadata=SERVICE))

            for rpc, request in [
                ("Follow", follow_pb2.FollowRequest(follower_id=user, followed_id=stranger)),
                ("GetFollowCounts", follow_pb2.GetFollowCountsRequest(user_ids=[user, friend])),
                ("GetFollowStates", follow_pb2.GetFollowStatesRequest(user_id=user, other_user_ids=[friend])),
                ("ListFollowing", follow_pb2.ListFollowingRequest(user_id=user)),
                ("ListFollowers", follow_pb2.ListFollowersRequest(user_id=user)),
                ("Unfollow", follow_pb2.UnfollowRequest(follower_id=user, followed_id=stranger)),
            ]:
                two_workers = {cluster.a, cluster.b} if rpc in ("Follow", "Unfollow") else None
                await call(rpc, getattr(follows, rpc)(request, metadata=SERVICE), two_workers)

            for rpc, request in [
                ("Credit", token_pb2.CreditRequest(user_id=user, amount=10, reason="r", reference_id="r",
                                                   request_id="c1")),
                ("Deduct", token_pb2.DeductRequest(user_id=user, amount=1, reason="r", reference_id="r",
                                                   request_id="d1")),
                ("Transfer", token_pb2.TransferRequest(from_user_id=user, to_user_id=stranger, amount=1, reason="r",
                                                       reference_id="r", request_id="t1")),
                ("GetBalances", token_pb2.GetBalancesRequest(user_ids=[user, friend])),
                ("ListTransactions", token_pb2.ListTransactionsRequest(user_id=user)),
            ]:
                await call(rpc, getattr(tokens, rpc)(request, metadata=SERVICE),
                           {cluster.a, cluster.b} if rpc == "Transfer" else None)
            # A batch reaches the workers of the users in it: here a credit and a transfer of one user to B.
            await call("SubmitOperations", tokens.SubmitOperations(token_pb2.SubmitOperationsRequest(operations=[
                token_pb2.Operation(request_id="b1", credit=token_pb2.CreditRequest(user_id=user, amount=5)),
                token_pb2.Operation(request_id="b2", linked=True, transfer=token_pb2.TransferRequest(
                    from_user_id=user, to_user_id=stranger, amount=1)),
                token_pb2.Operation(request_id="b3", deduct=token_pb2.DeductRequest(user_id=user, amount=1)),
            ]), metadata=SERVICE), {cluster.a, cluster.b})
            await call("SetAccountPolicy", tokens.SetAccountPolicy(
                token_pb2.SetAccountPolicyRequest(user_id=user, overdraft_limit=5), metadata=SERVICE))
            # A pending transfer lives on the worker its random id hashes to; posts and voids run there.
            holds = []
            for n in range(2):
                request = token_pb2.CreatePendingTransferRequest(from_user_id=user, to_user_id=stranger, amount=1,
                                                                 request_id=f"hold{n}")
                created = await call("CreatePendingTransfer", tokens.CreatePendingTransfer(request, metadata=SERVICE))
                pending_id = created.pending_transfer.pending_transfer_id
                owners = {cluster.a, cluster.b, await worker_of(conn, pending_id, "pending_transfers")}
                checked[f"CreatePendingTransfer{n}"] = (checked.pop("CreatePendingTransfer")[0], owners)
                holds.append((pending_id, owners))
            (posted, post_owners), (voided, void_owners) = holds
            await call("PostPendingTransfer", tokens.PostPendingTransfer(
                token_pb2.PostPendingTransferRequest(pending_transfer_id=posted, request_id="p1"), metadata=SERVICE),
                post_owners)
            await call("VoidPendingTransfer", tokens.VoidPendingTransfer(
                token_pb2.VoidPendingTransferRequest(pending_transfer_id=voided, request_id="v1"), metadata=SERVICE),
                void_owners)
            checked["CreatePendingTransfer"] = checked.pop("CreatePendingTransfer0")
            checked["CreatePendingTransfer (second)"] = checked.pop("CreatePendingTransfer1")

            created = await call("CreateMemory", memories.CreateMemory(
                memory_pb2.CreateMemoryRequest(user_id=user, content="the river was cold", gravity_score=0.9,
                                               emotion_type="joy"), metadata=SERVICE))
            memory_id = created.memory.memory_id
            for rpc, request in [
                ("GetMemory", memory_pb2.GetMemoryRequest(user_id=user, memory_id=memory_id)),
                ("UpdateMemory", memory_pb2.UpdateMemoryRequest(
                    memory=memory_pb2.Memory(user_id=user, memory_id=memory_id, content="the river was warm"),
                    update_mask=field_mask_pb2.FieldMask(paths=["content"]))),
                ("ListMemories", memory_pb2.ListMemoriesRequest(user_id=user)),
                ("SearchMemories", memory_pb2.SearchMemoriesRequest(user_id=user, query="river", top_k=5)),
                ("ListArcs", memory_pb2.ListArcsRequest(user_id=user)),
                ("SetIdentityEntities", memory_pb2.SetIdentityEntitiesRequest(user_id=user, entities=["river"])),
                ("TouchSession", memory_pb2.TouchSessionRequest(
                    user_id=user, session_id="s1", status=memory_pb2.SESSION_STATUS_ACTIVE)),
                ("ListSessions", memory_pb2.ListSessionsRequest(user_id=user)),
                ("RecordPattern", memory_pb2.RecordPatternRequest(user_id=user, pattern_type="walk", intensity=0.5)),
                ("ListPatterns", memory_pb2.ListPatternsRequest(user_id=user)),
                ("DeleteMemory", memory_pb2.DeleteMemoryRequest(user_id=user, memory_id=memory_id)),
            ]:
                await call(rpc, getattr(memories, rpc)(request, metadata=SERVICE))
            await stream("SubscribeMemories", memories.SubscribeMemories(
                memory_pb2.SubscribeMemoriesRequest(user_id=user), metadata=SERVICE))
            await stream("SubscribeArcs", memories.SubscribeArcs(
                memory_pb2.SubscribeArcsRequest(user_id=user), metadata=SERVICE))
    finally:
        await nexus.stop(grace=0)
        await conn.close()

    wrong = {}
    for rpc, (reached, owners) in checked.items():
        expected = {"none": set(), "keys": owners, "every": cluster.workers}[REACH[rpc.removesuffix(" (second)")]]
        if reached != expected:
            wrong[rpc] = f"reached {sorted(reached)}, expected {sorted(expected)}"
    assert not wrong, f"workers reached not as REACH says (A={cluster.a}, B={cluster.b}): {wrong}"
    assert {rpc.removesuffix(" (second)") for rpc in checked} == set(REACH), "an RPC is not called, or not classified"


def test_the_citus_guide_lists_each_rpc_under_the_workers_it_reaches() -> None:
    """docs/citus.md's three lists say what REACH says, which the test above checks on the cluster."""
    guide = (ROOT / "docs" / "citus.md").read_text(encoding="utf-8")
    listed: dict[str, str] = {}
    for reach, heading in (("keys", "Only the workers that own the call's keys"), ("every", "Every worker"),
                           ("none", "No worker")):
        found = re.search(rf"^- \*\*{re.escape(heading)}\*\*(.*?)(?=^\S|^- |\Z)", guide, re.MULTILINE | re.DOTALL)
        assert found, f"docs/citus.md has no list headed **{heading}**"
        listed |= dict.fromkeys(re.findall(r"`([A-Z][A-Za-z]+)`", found.group(1)), reach)
    assert listed == REACH
