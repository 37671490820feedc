"""``nexus seed``: a small demo world, created through the running server's RPCs.

Users alice, bob, carol and dave; a few entries with a reply tree; likes,
amplifications, a share and saved/applied states; follows; 100 tokens each
and a tip. Request ids and idempotent calls make it safe to run twice: the
second run changes nothing.
"""

from __future__ import annotations

from nexus.cli.client import open_channel, service_metadata
from nexus.config import Config
from nexus.v1 import follow_pb2, follow_pb2_grpc, interaction_pb2_grpc, token_pb2, token_pb2_grpc
from nexus.v1 import interaction_pb2 as pb

USERS = ("alice", "bob", "carol", "dave")

ENTRIES: tuple[tuple[str, str, str, str, pb.Privacy.ValueType, list[str]], ...] = (
    ("alice", "logbook", "First light", "Started the observatory log today.", pb.PRIVACY_PUBLIC, ["astronomy"]),
    ("bob", "dream", "Glass city", "A city of glass under a green sky.", pb.PRIVACY_PUBLIC, ["dreams"]),
    ("carol", "logbook", "Private notes", "Only for me.", pb.PRIVACY_PRIVATE, []),
)

# (author, index of the parent among created entries, content)
REPLIES = (
    ("bob", 0, "Which telescope?"),
    ("alice", 3, "A 200 mm Dobsonian."),
    ("carol", 0, "Clear skies!"),
    ("dave", 1, "I had the same dream."),
)


async def seed(config: Config) -> int:
    metadata = service_metadata(config, "seed")
    async with open_channel(config) as channel:
        stub = interaction_pb2_grpc.InteractionServiceStub(channel)
        entries: list[pb.Entry] = []
        for i, (author, kind, title, content, privacy, tags) in enumerate(ENTRIES):
            request = pb.CreateEntryRequest(
                author_id=author, type=kind, title=title, content=content, privacy=privacy, tags=tags,
                request_id=f"seed-entry-{i}",
            )
            entries.append((await stub.CreateEntry(request, metadata=metadata)).entry)
        for i, (author, parent, content) in enumerate(REPLIES):
            reply = pb.CreateBranchRequest(
                author_id=author, parent_entry_id=entries[parent].entry_id, type="reply", content=content,
                request_id=f"seed-reply-{i}",
            )
            entries.append((await stub.CreateBranch(reply, metadata=metadata)).entry)
        public = [e for e in entries if e.privacy == pb.PRIVACY_PUBLIC]
        for user in USERS:
            for entry in public[: len(user)]:
                await stub.SetResonance(
                    pb.SetResonanceRequest(user_id=user, entry_id=entry.entry_id, resonated=True), metadata=metadata
                )
        await stub.SetAmplification(
            pb.SetAmplificationRequest(user_id="carol", entry_id=entries[1].entry_id, amplified=True), metadata=metadata
        )
        await stub.RecordShare(
            pb.RecordShareRequest(user_id="dave", entry_id=entries[0].entry_id, request_id="seed-share-0"), metadata=metadata
        )
        for user, target, action in (("alice", "grant-42", "saved"), ("bob", "grant-42", "applied")):
            await stub.RecordInteraction(
                pb.RecordInteractionRequest(user_id=user, target_id=target, action=action), metadata=metadata
            )
        follows = follow_pb2_grpc.FollowServiceStub(channel)
        for follower, followed in (("bob", "alice"), ("carol", "alice"), ("alice", "bob"), ("dave", "carol")):
            await follows.Follow(follow_pb2.FollowRequest(follower_id=follower, followed_id=followed), metadata=metadata)
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        for user in USERS:
            await tokens.Credit(
                token_pb2.CreditRequest(user_id=user, amount=100, reason="welcome", request_id="seed-welcome"),
                metadata=metadata,
            )
        await tokens.Transfer(
            token_pb2.TransferRequest(
                from_user_id="bob", to_user_id="alice", amount=10, reason="tip", reference_id=entries[0].entry_id,
                request_id="seed-tip",
            ),
            metadata=metadata,
        )
    print(f"seeded {len(entries)} entries for users {', '.join(USERS)}; root entry: {entries[0].entry_id}")
    return 0
