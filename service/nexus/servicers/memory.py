"""nexus.v1.MemoryService.

Memories, arcs, sessions and patterns belong to their user: only that user
(or a service) reads or writes them. The insert rules, arc building and the
event log live in the database (db/functions/memories.sql); the servicer
validates and converts. ``MemoryServicer`` is the one servicer of the
service, made of its areas: memories (here), search (memory_search), arcs,
sessions and patterns (memory_context), and streams (memory_streams).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from nexus import embedder, queries, validation
from nexus.auth import acting_user
from nexus.config import Config
from nexus.database import Database
from nexus.errors import InvalidArgument
from nexus.group_commit import GroupCommit
from nexus.pagination import PageTokens
from nexus.realtime import EventHub
from nexus.servicers.memory_context import MemoryContext
from nexus.servicers.memory_messages import TEMPORAL_TYPE_NAMES, document_position, memory_message
from nexus.servicers.memory_search import MemorySearch
from nexus.servicers.memory_streams import MemoryStreams
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

UPDATABLE_FIELDS = (
    "content", "thread_id", "session_id", "memory_trace_id", "gravity_score", "emotion_type", "entities",
    "meta_tags", "temporal_type", "identity_anchor", "embedding",
)  # fmt: skip
MAX_CONTENT_CHARS = 20_000
MAX_ID_CHARS = 128
MAX_ENTITIES = 64
MAX_TAGS = 64


# The streaming RPCs write with context.write() (grpc.aio allows it), where the
# generated base class declares an iterator of responses.
class MemoryServicer(MemorySearch, MemoryContext, MemoryStreams, memory_pb2_grpc.MemoryServiceServicer):  # type: ignore[misc]
    def __init__(self, db: Database, page_tokens: PageTokens, hub: EventHub, config: Config) -> None:
        self._db = db
        self._tokens = page_tokens
        self._hub = hub
        self._embedding_dim = config.embedding_dim
        self._embedder = embedder.from_config(config.embedder)
        self._hybrid_vector_weight = config.hybrid_vector_weight
        self._exact_search_max = config.search_exact_max_memories
        # Keyed by user: a user's creates apply in arrival order, and this
        # server's batches never wait on each other's user locks.
        self._creates = GroupCommit(db, queries.CREATE_MEMORIES)

    # -- memories -------------------------------------------------------------

    async def CreateMemory(self, request: pb.CreateMemoryRequest, context: grpc.aio.ServicerContext) -> pb.CreateMemoryResponse:
        user_id = acting_user(request.user_id)
        content = validation.text(request.content, "content", MAX_CONTENT_CHARS)
        if not content.strip():
            raise InvalidArgument("content", "required")
        embedding = validation.embedding(request.embedding, "embedding", self._embedding_dim, required=False)
        if embedding is None and self._embedder is not None:
            embedding = await self._embedder.embed(content)
        arguments = (
            user_id,
            content,
            validation.optional_opaque_id(request.thread_id, "thread_id"),
            validation.optional_opaque_id(request.session_id, "session_id"),
            validation.optional_opaque_id(request.memory_trace_id, "memory_trace_id"),
            validation.score(request.gravity_score, "gravity_score"),
            validation.word(request.emotion_type, "emotion_type", required=False),
            validation.tags(request.entities, "entities", max_tags=MAX_ENTITIES, max_chars=MAX_ID_CHARS),
            validation.tags(request.meta_tags, "meta_tags", max_tags=MAX_TAGS),
            validation.optional_enum_value(request.temporal_type, "temporal_type", TEMPORAL_TYPE_NAMES),
            embedding,
            validation.request_id(request.request_id, required=False),
        )
        (row,) = await self._creates.submit((user_id,), (user_id,), arguments)
        document = row["document"]
        return pb.CreateMemoryResponse(memory=memory_message(document))

    async def GetMemory(self, request: pb.GetMemoryRequest, context: grpc.aio.ServicerContext) -> pb.GetMemoryResponse:
        user_id = acting_user(request.user_id)
        memory_id = validation.memory_id(request.memory_id, "memory_id")
        row = await self._db.fetchone(queries.GET_MEMORY, user_id, memory_id)  # NX404 when there is none
        embedding = row["embedding"].to_list() if request.include_embedding and row["embedding"] is not None else None
        return pb.GetMemoryResponse(memory=memory_message(row["document"], embedding))

    async def UpdateMemory(self, request: pb.UpdateMemoryRequest, context: grpc.aio.ServicerContext) -> pb.UpdateMemoryResponse:
        memory = request.memory
        user_id = acting_user(memory.user_id, "memory.user_id")
        memory_id = validation.memory_id(memory.memory_id, "memory.memory_id")
        paths = list(dict.fromkeys(request.update_mask.paths))
        if not paths:
            raise InvalidArgument("update_mask", "name the fields to change")
        for path in paths:
            if path not in UPDATABLE_FIELDS:
                raise InvalidArgument("update_mask", f"{path!r} is not one of {', '.join(UPDATABLE_FIELDS)}")
        masked = set(paths)

        def value(field: str, check: Callable[[], Any]) -> Any:
            return check() if field in masked else None

        content = value("content", lambda: validation.text(memory.content, "memory.content", MAX_CONTENT_CHARS))
        if content is not None and not content.strip():
            raise InvalidArgument("memory.content", "required")
        embedding = value(
            "embedding",
            lambda: validation.embedding(memory.embedding, "memory.embedding", self._embedding_dim, required=False),
        )
        if content is not None and "embedding" not in masked and self._embedder is not None:
            # The stored embedding describes the old content: computed again.
            embedding = await self._embedder.embed(content)
            paths.append("embedding")
        document = await self._db.fetchval(
            queries.UPDATE_MEMORY,
            user_id,
            memory_id,
            paths,
            content,
            value("thread_id", lambda: validation.optional_opaque_id(memory.thread_id, "memory.thread_id")),
            value("session_id", lambda: validation.optional_opaque_id(memory.session_id, "memory.session_id")),
            value(
                "memory_trace_id",
                lambda: validation.optional_opaque_id(memory.memory_trace_id, "memory.memory_trace_id"),
            ),
            value("gravity_score", lambda: validation.score(memory.gravity_score, "memory.gravity_score")),
            value("emotion_type", lambda: validation.word(memory.emotion_type, "memory.emotion_type", required=False)),
            value(
                "entities",
                lambda: validation.tags(memory.entities, "memory.entities", max_tags=MAX_ENTITIES, max_chars=MAX_ID_CHARS),
            ),
            value("meta_tags", lambda: validation.tags(memory.meta_tags, "memory.meta_tags", max_tags=MAX_TAGS)),
            value(  # cleared: inferred from the content again
                "temporal_type",
                lambda: validation.optional_enum_value(memory.temporal_type, "memory.temporal_type", TEMPORAL_TYPE_NAMES),
            ),
            memory.identity_anchor,
            embedding,
        )
        return pb.UpdateMemoryResponse(memory=memory_message(document))

    async def DeleteMemory(self, request: pb.DeleteMemoryRequest, context: grpc.aio.ServicerContext) -> pb.DeleteMemoryResponse:
        user_id = acting_user(request.user_id)
        memory_id = validation.memory_id(request.memory_id, "memory_id")
        await self._db.execute(queries.DELETE_MEMORY, user_id, memory_id)
        return pb.DeleteMemoryResponse()

    async def ListMemories(self, request: pb.ListMemoriesRequest, context: grpc.aio.ServicerContext) -> pb.ListMemoriesResponse:
        user_id = acting_user(request.user_id)
        limit = validation.page_size(request.page_size)
        scope = ("memories", user_id)
        after_time, after_id = self._tokens.decode_time_key(scope, request.page_token)
        documents = await self._db.fetch(
            queries.LIST_MEMORIES,
            user_id,
            validation.optional_timestamp(request, "since"),
            validation.unit_interval(request.min_gravity, "min_gravity"),
            validation.word(request.emotion_type, "emotion_type", required=False),
            validation.optional_opaque_id(request.thread_id, "thread_id"),
            validation.optional_opaque_id(request.session_id, "session_id"),
            validation.tags(request.tags_any, "tags_any") or None,
            request.identity_anchor_only,
            after_time,
            validation.memory_id(after_id, "page_token") if after_id is not None else None,
            limit + 1,
        )
        page, next_page_token = self._tokens.page(
            scope, documents, limit, lambda row: document_position(row["d"], "memory_id")
        )
        return pb.ListMemoriesResponse(
            memories=[memory_message(row["d"]) for row in page], next_page_token=next_page_token
        )

    async def SetIdentityEntities(
        self, request: pb.SetIdentityEntitiesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetIdentityEntitiesResponse:
        user_id = acting_user(request.user_id)
        names = validation.tags(request.entities, "entities", max_tags=MAX_ENTITIES, max_chars=MAX_ID_CHARS)
        distinct: dict[str, str] = {}
        for name in names:
            distinct.setdefault(name.lower(), name)  # the first spelling, in the order given
        entities = await self._db.fetchval(
            queries.SET_IDENTITY_ENTITIES, user_id, list(distinct.values())
        )
        return pb.SetIdentityEntitiesResponse(entities=entities)
