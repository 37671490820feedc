"""nexus.v1.InteractionService."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import asyncpg
import grpc

from nexus import queries, validation
from nexus.auth import acting_user, current_principal, optional_acting_user
from nexus.config import POSTGRES_INTEGER_MAX
from nexus.database import Database
from nexus.errors import InvalidArgument
from nexus.group_commit import GroupCommit
from nexus.pagination import PageTokens, time_key
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import interaction_pb2_grpc

PRIVACY_NAMES = {pb.PRIVACY_PUBLIC: "public", pb.PRIVACY_FOLLOWERS: "followers", pb.PRIVACY_PRIVATE: "private"}
PRIVACY_VALUES = {name: value for value, name in PRIVACY_NAMES.items()}

MAX_TITLE_CHARS = 300
MAX_CONTENT_CHARS = 40_000
MAX_NOTES_CHARS = 2000
# A home feed page: 20 items unless asked, at most 100 (each is hydrated).
DEFAULT_FEED_PAGE_SIZE = 20
MAX_FEED_PAGE_SIZE = 100
FEED_REASONS = {True: pb.FEED_REASON_AUTHORED, False: pb.FEED_REASON_AMPLIFIED}


def counts_message(row: Mapping[str, Any], entry_id: str) -> pb.InteractionCounts:
    return pb.InteractionCounts(
        entry_id=entry_id,
        resonance_count=row["resonance_count"],
        amplification_count=row["amplification_count"],
        branch_count=row["branch_count"],
        share_count=row["share_count"],
    )


def entry_message(entry: Mapping[str, Any], counts: pb.InteractionCounts | None = None) -> pb.Entry:
    entry_id = str(entry["entry_id"])
    message = pb.Entry(
        entry_id=entry_id,
        author_id=entry["author_id"],
        parent_entry_id=str(entry["parent_entry_id"] or ""),
        root_entry_id=str(entry["root_entry_id"] or ""),
        depth=entry["depth"],
        branch_order=entry["branch_order"],
        type=entry["type"],
        title=entry["title"],
        content=entry["content"],
        privacy=PRIVACY_VALUES[entry["privacy"]],
        tags=entry["tags"],
        counts=counts
        or pb.InteractionCounts(entry_id=entry_id, branch_count=entry["branch_count"]),
    )
    message.metadata.update(entry["metadata"])
    message.create_time.FromDatetime(entry["create_time"])
    message.update_time.FromDatetime(entry["update_time"])
    return message


def hydrated_entry_message(row: Mapping[str, Any]) -> pb.Entry:
    """An entry of get_entries (or a function that hydrates as it does), with its counts."""
    return entry_message(row, counts_message(row, str(row["entry_id"])))


def state_message(row: Mapping[str, Any]) -> pb.UserInteractionState:
    return pb.UserInteractionState(
        entry_id=str(row["entry_id"]), has_resonated=row["has_resonated"], has_amplified=row["has_amplified"]
    )


def feed_item_message(row: Mapping[str, Any]) -> pb.FeedItem:
    item = pb.FeedItem(
        entry=hydrated_entry_message(row),
        reason=FEED_REASONS[row["authored"]],
        amplified_by_user_ids=row["amplified_by"],
    )
    item.feed_time.FromDatetime(row["feed_time"])
    return item


def interaction_message(row: Mapping[str, Any]) -> pb.Interaction:
    message = pb.Interaction(user_id=row["user_id"], target_id=row["target_id"], action=row["action"], notes=row["notes"])
    message.update_time.FromDatetime(row["update_time"])
    message.create_time.FromDatetime(row["create_time"])
    return message


class InteractionServicer(interaction_pb2_grpc.InteractionServiceServicer):
    def __init__(self, db: Database, page_tokens: PageTokens, feed_retention: datetime.timedelta) -> None:
        self._db = db
        self._tokens = page_tokens
        self._feed_retention = feed_retention
        self._reactions = GroupCommit(db, queries.APPLY_REACTIONS)

    async def _create_entry(self, request: pb.CreateEntryRequest | pb.CreateBranchRequest, parent: Any) -> pb.Entry:
        author_id = acting_user(request.author_id, "author_id")
        row = await self._db.fetchone(
            queries.CREATE_ENTRY,
            author_id,
            parent,
            validation.word(request.type, "type"),
            validation.text(request.title, "title", MAX_TITLE_CHARS),
            validation.text(request.content, "content", MAX_CONTENT_CHARS),
            validation.enum_value(request.privacy, "privacy", PRIVACY_NAMES, default="public"),
            validation.tags(request.tags),
            validation.metadata(request.metadata),
            validation.request_id(request.request_id, required=False),
        )
        return entry_message(row)

    async def CreateEntry(self, request: pb.CreateEntryRequest, context: grpc.aio.ServicerContext) -> pb.CreateEntryResponse:
        return pb.CreateEntryResponse(entry=await self._create_entry(request, None))

    async def CreateBranch(self, request: pb.CreateBranchRequest, context: grpc.aio.ServicerContext) -> pb.CreateBranchResponse:
        parent = validation.entry_id(request.parent_entry_id, "parent_entry_id")
        return pb.CreateBranchResponse(entry=await self._create_entry(request, parent))

    async def GetEntries(self, request: pb.GetEntriesRequest, context: grpc.aio.ServicerContext) -> pb.GetEntriesResponse:
        entry_ids = validation.entry_ids(request.entry_ids, "entry_ids")
        viewer = optional_acting_user(request.viewer_id, "viewer_id")
        rows = await self._db.fetch(
            queries.GET_ENTRIES, entry_ids, viewer or current_principal.get().viewer, viewer
        )
        response = pb.GetEntriesResponse()
        for row in rows:
            response.entries.append(hydrated_entry_message(row))
            if viewer is not None:
                response.states.append(state_message(row))
        return response

    async def DeleteEntry(self, request: pb.DeleteEntryRequest, context: grpc.aio.ServicerContext) -> pb.DeleteEntryResponse:
        user_id = acting_user(request.user_id)
        entry_id = validation.entry_id(request.entry_id, "entry_id")
        await self._db.execute(queries.DELETE_ENTRY, user_id, entry_id)
        return pb.DeleteEntryResponse()

    async def _react(self, kind: str, request: Any, on: bool | None) -> tuple[asyncpg.Record, pb.InteractionCounts]:
        """Toggles (on=None) or sets a reaction; returns its reaction_outcome and counts."""
        user_id = acting_user(request.user_id)
        entry_id = validation.entry_id(request.entry_id, "entry_id")
        op = "toggle" if on is None else "on" if on else "off"
        (row,) = await self._reactions.submit((entry_id,), (entry_id,), entry_id, op, kind, user_id)
        outcome = row["outcome"]
        return outcome, counts_message(outcome, str(entry_id))

    async def ToggleResonance(
        self, request: pb.ToggleResonanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ToggleResonanceResponse:
        row, counts = await self._react("resonance", request, None)
        return pb.ToggleResonanceResponse(resonated=row["state"], counts=counts)

    async def SetResonance(self, request: pb.SetResonanceRequest, context: grpc.aio.ServicerContext) -> pb.SetResonanceResponse:
        row, counts = await self._react("resonance", request, request.resonated)
        return pb.SetResonanceResponse(resonated=row["state"], changed=row["changed"], counts=counts)

    async def ToggleAmplification(
        self, request: pb.ToggleAmplificationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ToggleAmplificationResponse:
        row, counts = await self._react("amplification", request, None)
        return pb.ToggleAmplificationResponse(amplified=row["state"], counts=counts)

    async def SetAmplification(
        self, request: pb.SetAmplificationRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAmplificationResponse:
        row, counts = await self._react("amplification", request, request.amplified)
        return pb.SetAmplificationResponse(amplified=row["state"], changed=row["changed"], counts=counts)

    async def RecordShare(self, request: pb.RecordShareRequest, context: grpc.aio.ServicerContext) -> pb.RecordShareResponse:
        user_id = acting_user(request.user_id)
        entry_id = validation.entry_id(request.entry_id, "entry_id")
        request_id = validation.request_id(request.request_id, required=True)
        row = await self._db.fetchone(queries.RECORD_SHARE, user_id, entry_id, request_id)
        return pb.RecordShareResponse(counts=counts_message(row, str(entry_id)), recorded=row["changed"])

    async def GetBranchTree(
        self, request: pb.GetBranchTreeRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBranchTreeResponse:
        entry_id = validation.entry_id(request.root_entry_id, "root_entry_id")
        if request.max_depth < 0:
            raise InvalidArgument("max_depth", "must not be negative")
        limit = validation.page_size(request.page_size)
        viewer = optional_acting_user(request.viewer_id, "viewer_id") or current_principal.get().viewer
        scope = ("tree", str(entry_id), request.max_depth, viewer)
        after = self._tokens.decode(scope, request.page_token)
        if after is not None and not all(type(i) is int and i <= POSTGRES_INTEGER_MAX for i in after):  # a tree_path
            raise InvalidArgument("page_token", "not a token issued by this service")
        rows = await self._db.fetch(
            queries.BRANCH_TREE, entry_id, viewer, request.max_depth or None, after, limit + 1
        )
        page, next_page_token = self._tokens.page(scope, rows, limit, lambda row: list(row["tree_path"]))
        return pb.GetBranchTreeResponse(
            nodes=[
                pb.BranchNode(
                    entry_id=str(r["entry_id"]),
                    parent_entry_id=str(r["parent_entry_id"] or ""),
                    depth=r["depth"],
                    branch_order=r["branch_order"],
                    deleted=r["deleted"],
                )
                for r in page
            ],
            next_page_token=next_page_token,
        )

    async def GetInteractionCounts(
        self, request: pb.GetInteractionCountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInteractionCountsResponse:
        entry_ids = validation.entry_ids(request.entry_ids, "entry_ids")
        rows = await self._db.fetch(queries.ENTRY_COUNTS, entry_ids, current_principal.get().viewer)
        return pb.GetInteractionCountsResponse(counts=[counts_message(r, str(r["entry_id"])) for r in rows])

    async def GetUserInteractionStates(
        self, request: pb.GetUserInteractionStatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserInteractionStatesResponse:
        user_id = acting_user(request.user_id)
        entry_ids = validation.entry_ids(request.entry_ids, "entry_ids")
        rows = await self._db.fetch(queries.USER_INTERACTION_STATES, user_id, entry_ids)
        return pb.GetUserInteractionStatesResponse(
            states=[
                pb.UserInteractionState(
                    entry_id=str(r["entry_id"]), has_resonated=r["has_resonated"], has_amplified=r["has_amplified"]
                )
                for r in rows
            ]
        )

    async def ListResonators(
        self, request: pb.ListResonatorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResonatorsResponse:
        entry_id = validation.entry_id(request.entry_id, "entry_id")
        limit = validation.page_size(request.page_size)
        scope = ("resonators", str(entry_id))
        after_time, after_user = self._tokens.decode_time_key(scope, request.page_token)
        rows = await self._db.fetch(
            queries.LIST_REACTORS,
            "resonance",
            entry_id,
            current_principal.get().viewer,
            after_time,
            after_user,
            limit + 1,
        )
        page, next_page_token = self._tokens.page(
            scope, rows, limit, lambda row: time_key(row["create_time"], row["user_id"])
        )
        return pb.ListResonatorsResponse(user_ids=[r["user_id"] for r in page], next_page_token=next_page_token)

    async def ListHomeFeed(self, request: pb.ListHomeFeedRequest, context: grpc.aio.ServicerContext) -> pb.ListHomeFeedResponse:
        viewer = acting_user(request.viewer_id, "viewer_id")
        limit = validation.page_size(request.page_size, default=DEFAULT_FEED_PAGE_SIZE, maximum=MAX_FEED_PAGE_SIZE)
        scope = ("home_feed", viewer)
        after_time, after_entry = self._tokens.decode_time_key(scope, request.page_token)
        rows = await self._db.fetch(
            queries.LIST_HOME_FEED,
            viewer,
            after_time,
            after_entry and validation.entry_id(after_entry, "page_token"),
            limit + 1,
            self._feed_retention,
        )
        page, next_page_token = self._tokens.page(
            scope, rows, limit, lambda row: time_key(row["feed_time"], str(row["entry_id"]))
        )
        return pb.ListHomeFeedResponse(
            items=[feed_item_message(row) for row in page],
            states=[state_message(row) for row in page],
            next_page_token=next_page_token,
        )

    async def RecordInteraction(
        self, request: pb.RecordInteractionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordInteractionResponse:
        user_id = acting_user(request.user_id)
        target_id = validation.opaque_id(request.target_id, "target_id")
        action = validation.word(request.action, "action")
        notes = validation.text(request.notes, "notes", MAX_NOTES_CHARS)
        row = await self._db.fetchone(
            queries.RECORD_INTERACTION, user_id, target_id, action, notes
        )
        return pb.RecordInteractionResponse(interaction=interaction_message(row), created=row["created"])

    async def ListInteractions(
        self, request: pb.ListInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListInteractionsResponse:
        user_id = acting_user(request.user_id)
        action = validation.word(request.action, "action", required=False)
        limit = validation.page_size(request.page_size)
        scope = ("interactions", user_id, action)
        after_time, after_target = self._tokens.decode_time_key(scope, request.page_token)
        rows = await self._db.fetch(
            queries.LIST_INTERACTIONS, user_id, action, after_time, after_target, limit + 1
        )
        page, next_page_token = self._tokens.page(
            scope, rows, limit, lambda row: time_key(row["update_time"], row["target_id"])
        )
        return pb.ListInteractionsResponse(
            interactions=[interaction_message(r) for r in page], next_page_token=next_page_token
        )
