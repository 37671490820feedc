"""The load: bench data, the RPC scenarios, and pgbench scripts of the same SQL.

Every pgbench script calls the stored function the service calls for the
matching RPC (nexus/queries.py), with its key as a constant or a bind
parameter, so that on Citus it is delegated to the key's worker exactly as the
service's call is.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.core import Call, progress
from nexus import database
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

USERS = 1_000_000  # reacting / following / paid users: a range to draw from, nothing loaded
WRITERS = 1000  # users whose memories CreateMemory writes
FUNDING = 10**12  # tokens per payer: no transfer ever runs out


def entry_id(n: int) -> str:
    """Bench entry n's id; SQL computes it as md5('bench-entry-' || n)::uuid."""
    return str(uuid.UUID(hashlib.md5(f"bench-entry-{n}".encode()).hexdigest()))


HOT_ENTRY = entry_id(1)
ENTRY_SQL = "CAST(md5('bench-entry-' || {n}) AS uuid)"


@dataclass(frozen=True)
class Workload:
    """The sizes of the bench data; ``scale`` 1 is the README's run."""

    entries: int
    payers: int
    embedding_dim: int

    @classmethod
    def scaled(cls, scale: float, embedding_dim: int) -> Workload:
        return cls(entries=max(200, round(100_000 * scale)), payers=max(16, round(10_000 * scale)),
                   embedding_dim=embedding_dim)

    async def load(self, url: str) -> None:
        """Entries whose ids pgbench can compute, and funded payers: credited through
        the ledger function (so balances equal the ledger), once per payer whatever
        the number of runs (a request id per payer)."""
        progress(f"loading {self.entries} entries and funding {self.payers} payers")
        conn = await database.connect(url)
        try:
            await conn.execute(f"""
                INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type, title,
                                     content, privacy, tags, metadata)
                SELECT id, 'bench-author', id, 0, 0, '{{}}', 'post', 'bench', 'bench entry', 'public', '{{}}', '{{}}'
                FROM generate_series(1, {self.entries}) n, {ENTRY_SQL.format(n='n')} AS id
                ON CONFLICT DO NOTHING""")
        finally:
            await conn.close()
        async with asyncpg.create_pool(url, min_size=8, max_size=8) as pool:
            # One call per payer, outside a transaction block: on Citus each runs on the payer's worker.
            await asyncio.gather(*(
                pool.fetchval(
                    "SELECT count(*) FROM apply_token_operations($1, ARRAY[$1], ARRAY['credit'], ARRAY[NULL],"
                    " ARRAY[$2::bigint], ARRAY['bench funding'], ARRAY[''], ARRAY['bench-funding'])",
                    f"bench-payer-{n}", FUNDING)
                for n in range(1, self.payers + 1)
            ))
            await pool.execute("ANALYZE")

    def embedding(self) -> list[float]:
        return [random.uniform(-1, 1) for _ in range(self.embedding_dim)]

    def rpc_scenarios(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> dict[str, Call]:
        """Each scenario is one call with fresh random arguments."""
        health = health_pb2_grpc.HealthStub(channel)
        interactions = interaction_pb2_grpc.InteractionServiceStub(channel)
        follows = follow_pb2_grpc.FollowServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)

        def user() -> str:
            return f"bench-user-{random.randint(1, USERS)}"

        def toggle(entry: Callable[[], str]) -> Call:
            return lambda: interactions.ToggleResonance(
                interaction_pb2.ToggleResonanceRequest(user_id=user(), entry_id=entry()), metadata=metadata
            )

        def get_entries() -> Awaitable[object]:
            first = random.randint(2, self.entries - 100)
            ids = [entry_id(n) for n in range(first, first + 99)] + [HOT_ENTRY]
            return interactions.GetEntries(
                interaction_pb2.GetEntriesRequest(entry_ids=ids, viewer_id="bench-viewer"), metadata=metadata
            )

        def follow(followed: Callable[[], str]) -> Call:
            return lambda: follows.Follow(
                follow_pb2.FollowRequest(follower_id=user(), followed_id=followed()), metadata=metadata
            )

        def transfer(payee: Callable[[], str]) -> Call:
            return lambda: tokens.Transfer(
                token_pb2.TransferRequest(
                    from_user_id=f"bench-payer-{random.randint(1, self.payers)}", to_user_id=payee(), amount=1,
                    reason="bench", request_id=uuid.uuid4().hex,
                ),
                metadata=metadata,
            )

        return {
            "health Check (transport ceiling)": lambda: health.Check(health_pb2.HealthCheckRequest()),
            "ToggleResonance uniform": toggle(lambda: entry_id(random.randint(1, self.entries))),
            "ToggleResonance hot entry": toggle(lambda: HOT_ENTRY),
            "GetEntries 100 ids": get_entries,
            "Follow uniform": follow(lambda: f"bench-followed-{random.randint(1, USERS)}"),
            "Follow one celebrity": follow(lambda: "bench-celebrity"),
            "Transfer uniform": transfer(lambda: f"bench-payee-{random.randint(1, USERS)}"),
            "Transfer to one hot merchant": transfer(lambda: "bench-merchant"),
        }

    def create_memory(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Call:
        """CreateMemory with an embedding of the configured dimension, by one of WRITERS users."""
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        return lambda: stub.CreateMemory(
            memory_pb2.CreateMemoryRequest(
                user_id=f"bench-writer-{random.randint(1, WRITERS)}", content="bench create",
                gravity_score=random.random(), emotion_type="calm", embedding=self.embedding(),
            ),
            metadata=metadata,
        )

    def pgbench_scripts(self) -> dict[str, str]:
        """pgbench scripts by name: what the service sends to the database for one call."""
        toggle = ("SELECT * FROM apply_reactions({entry}, ARRAY[{entry}], ARRAY['toggle'], "
                  "ARRAY['resonance']::reaction_kind[], ARRAY['bench-user-' || :user]);")
        transfer = ("\\set payer random(1, {payers})\n\\set request random(1, 1000000000000)\n"
                    "SELECT count(*) FROM apply_token_operations('bench-payer-' || :payer, "
                    "ARRAY['bench-payer-' || :payer], ARRAY['transfer'], ARRAY[{payee}], ARRAY[1::bigint], "
                    "ARRAY['bench'], ARRAY[''], ARRAY['pgbench-' || :request]);")
        embedding = "[" + ",".join(f"{x:.4f}" for x in self.embedding()) + "]"
        return {
            "toggle uniform": f"\\set entry random(1, {self.entries})\n\\set user random(1, {USERS})\n"
            + toggle.format(entry=ENTRY_SQL.format(n=":entry")),
            "toggle hot": f"\\set user random(1, {USERS})\n" + toggle.format(entry=ENTRY_SQL.format(n=1)),
            # 16 users on one entry in one call: what group commit sends for a hot entry.
            "toggle hot, 16 per call": f"""SELECT count(*) FROM apply_reactions({ENTRY_SQL.format(n=1)},
    array_fill({ENTRY_SQL.format(n=1)}, ARRAY[16]), array_fill('toggle'::text, ARRAY[16]),
    array_fill('resonance'::reaction_kind, ARRAY[16]),
    (SELECT array_agg('bench-user-' || (1 + floor(random() * {USERS}))::int) FROM generate_series(1, 16)));""",
            # 16 toggles of 16 random entries in one call: what group commit sends on one node for uniform load.
            "toggle uniform, 16 per call": f"""SELECT count(*) FROM apply_reactions(NULL,
    (SELECT array_agg({ENTRY_SQL.format(n=f"(1 + floor(random() * {self.entries}))::int")}) FROM generate_series(1, 16)),
    array_fill('toggle'::text, ARRAY[16]), array_fill('resonance'::reaction_kind, ARRAY[16]),
    (SELECT array_agg('bench-user-' || (1 + floor(random() * {USERS}))::int) FROM generate_series(1, 16)));""",
            # 100 entries, the hot one among them, as GetEntries' counts read them: one uuid[] parameter.
            "counts 100": f"""\\set first random(2, {self.entries - 100})
SELECT count(*) FROM entry_counts(
    (SELECT array_agg({ENTRY_SQL.format(n='n')}) FROM generate_series(:first, :first + 98) n)
    || {ENTRY_SQL.format(n=1)}, NULL);""",
            "follow uniform": f"\\set user random(1, {USERS})\n\\set followed random(1, {USERS})\n"
            "SELECT follow('bench-user-' || :user, 'bench-followed-' || :followed);",
            "transfer uniform": f"\\set payee random(1, {USERS})\n"
            + transfer.format(payers=self.payers, payee="'bench-payee-' || :payee"),
            "transfer hot": transfer.format(payers=self.payers, payee="'bench-merchant'"),
            # 16 transfers of 16 random payers to 16 random payees in one call: what group commit sends on one node.
            "transfer uniform, 16 per call": f"""SELECT count(*) FROM apply_token_operations(NULL,
    (SELECT array_agg('bench-payer-' || (1 + floor(random() * {self.payers}))::int) FROM generate_series(1, 16)),
    array_fill('transfer'::text, ARRAY[16]),
    (SELECT array_agg('bench-payee-' || (1 + floor(random() * {USERS}))::int) FROM generate_series(1, 16)),
    array_fill(1::bigint, ARRAY[16]), array_fill('bench'::text, ARRAY[16]), array_fill(''::text, ARRAY[16]),
    (SELECT array_agg(gen_random_uuid()::text) FROM generate_series(1, 16)));""",
            "create_memories 1": f"\\set writer random(1, {WRITERS})\n"
            "SELECT count(*) FROM create_memories('bench-writer-' || :writer, ARRAY[ROW('bench-writer-' || :writer, "
            f"'bench create', NULL, NULL, NULL, 0.5, 'calm', '{{}}', '{{}}', NULL, '{embedding}'::vector, NULL)"
            "::memory_create]);",
        }
