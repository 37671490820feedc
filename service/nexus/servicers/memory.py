"""nexus.v1.MemoryService.

Memories, arcs, sessions and patterns belong to their user: only that user
(or a service) reads or writes them. The insert rules, arc building and the
event log live in the database (db/0004_memories.sql); this module validates,
converts and streams.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from nexus import embedder, errors, queries, validation
from nexus.auth import current_principal
from nexus.config import Config
from nexus.database import Database
from nexus.errors import FailedPrecondition, InvalidArgument, NotFound
from nexus.group_commit import GroupCommit
from nexus.pagination import PageTokens
from nexus.realtime import READ_BATCH, EventHub
from nexus.v1 import memory_pb2 as pb
from nexus.v1 import memory_pb2_grpc

TEMPORAL_TYPES = {"past": pb.TEMPORAL_TYPE_PAST, "present": pb.TEMPORAL_TYPE_PRESENT, "future": pb.TEMPORAL_TYPE_FUTURE}
EVOLUTION_STAGES = {
    "forming": pb.EVOLUTION_STAGE_FORMING,
    "active": pb.EVOLUTION_STAGE_ACTIVE,
    "dormant": pb.EVOLUTION_STAGE_DORMANT,
}
EVENT_TYPES = {"created": pb.EVENT_TYPE_CREATED, "updated": pb.EVENT_TYPE_UPDATED, "deleted": pb.EVENT_TYPE_DELETED}
SESSION_STATUSES = {
    "active": pb.SESSION_STATUS_ACTIVE,
    "idle": pb.SESSION_STATUS_IDLE,
    "ended": pb.SESSION_STATUS_ENDED,
}
TEMPORAL_TYPE_NAMES = {number: name for name, number in TEMPORAL_TYPES.items()}
SESSION_STATUS_NAMES = {number: name for name, number in SESSION_STATUSES.items()}
METRICS = {pb.DISTANCE_METRIC_COSINE: "cosine", pb.DISTANCE_METRIC_L2: "l2"}
UPDATABLE_FIELDS = (
    "content", "thread_id", "session_id", "memory_trace_id", "gravity_score", "emotion_type", "entities",
    "meta_tags", "temporal_type", "identity_anchor", "embedding",
)  # fmt: skip
MAX_CONTENT_CHARS = 20_000
MAX_ID_CHARS = 128
MAX_ENTITIES = 64
MAX_TAGS = 64
MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_QUERY_CHARS = 1000
MAX_EVENT_NAME_CHARS = 64
# NOTIFY carries at most 8000 bytes; the envelope needs the rest.
MAX_BROADCAST_PAYLOAD_BYTES = 7000
# Initial metadata of a stream: the position it started at, as a resume token.
RESUME_TOKEN_METADATA = "x-nexus-resume-token"


def _timestamp(value: str | datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.datetime.fromisoformat(value) if isinstance(value, str) else value)
    return stamp


def memory_message(document: Mapping[str, Any], embedding: list[float] | None = None) -> pb.Memory:
    return pb.Memory(
        memory_id=document["memory_id"],
        user_id=document["user_id"],
        content=document["content"],
        thread_id=document["thread_id"] or "",
        session_id=document["session_id"] or "",
        memory_trace_id=document["memory_trace_id"] or "",
        gravity_score=document["gravity_score"],
        emotion_type=document["emotion_type"] or "",
        entities=document["entities"],
        meta_tags=document["meta_tags"],
        temporal_type=TEMPORAL_TYPES[document["temporal_type"]],
        identity_anchor=document["identity_anchor"],
        embedding=embedding or (),
        create_time=_timestamp(document["create_time"]),
        update_time=_timestamp(document["update_time"]),
    )


def arc_message(document: Mapping[str, Any]) -> pb.Arc:
    return pb.Arc(
        arc_id=document["arc_id"],
        user_id=document["user_id"],
        arc_name=document["arc_name"],
        emotion_type=document["emotion_type"],
        gravity_center=document["gravity_center"],
        evolution_stage=EVOLUTION_STAGES[document["evolution_stage"]],
        memory_ids=document["memory_ids"],
        create_time=_timestamp(document["create_time"]),
        update_time=_timestamp(document["update_time"]),
    )


def session_message(row: Mapping[str, Any]) -> pb.Session:
    return pb.Session(
        user_id=row["user_id"],
        session_id=row["session_id"],
        status=SESSION_STATUSES[row["status"]],
        last_message_time=_timestamp(row["last_message_time"]),
        create_time=_timestamp(row["create_time"]),
    )


def pattern_message(row: Mapping[str, Any]) -> pb.Pattern:
    return pb.Pattern(
        user_id=row["user_id"],
        pattern_type=row["pattern_type"],
        intensity=row["intensity"],
        occurrences=row["occurrences"],
        create_time=_timestamp(row["create_time"]),
        update_time=_timestamp(row["update_time"]),
    )


def _memory_event(row: Mapping[str, Any], resume_token: str) -> pb.SubscribeMemoriesResponse:
    return pb.SubscribeMemoriesResponse(
        type=EVENT_TYPES[row["change"]],
        memory=memory_message(row["document"]),
        resume_token=resume_token,
        event_time=_timestamp(row["create_time"]),
    )


def _arc_event(row: Mapping[str, Any], resume_token: str) -> pb.SubscribeArcsResponse:
    return pb.SubscribeArcsResponse(
        type=EVENT_TYPES[row["change"]],
        arc=arc_message(row["document"]),
        resume_token=resume_token,
        event_time=_timestamp(row["create_time"]),
    )


def _since(request: Any) -> datetime.datetime | None:
    return validation.timestamp(request.since, "since") if request.HasField("since") else None


def _memory_id(value: str, field: str) -> uuid.UUID:
    return validation.entry_id(value, field)


def _resume_token_expired() -> FailedPrecondition:
    return FailedPrecondition(
        "RESUME_TOKEN_EXPIRED", "events after this position are past retention; subscribe without a token and reload"
    )


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
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
        self._creates = GroupCommit(db, "create_memories", queries.CREATE_MEMORIES)

    def _owner(self, value: str, field: str = "user_id") -> str:
        """The request's user, whom the caller must be (or a service)."""
        user_id = validation.user_id(value, field)
        current_principal.get().require_acting_as(user_id, field)
        return user_id

    # -- memories -------------------------------------------------------------

    async def CreateMemory(self, request: pb.CreateMemoryRequest, context: grpc.aio.ServicerContext) -> pb.CreateMemoryResponse:
        user_id = self._owner(request.user_id)
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
            validation.unit_interval(request.gravity_score, "gravity_score"),
            validation.word(request.emotion_type, "emotion_type", required=False),
            validation.tags(request.entities, "entities", max_tags=MAX_ENTITIES, max_chars=MAX_ID_CHARS),
            validation.tags(request.meta_tags, "meta_tags", max_tags=MAX_TAGS),
            validation.optional_enum_value(request.temporal_type, "temporal_type", TEMPORAL_TYPE_NAMES),
            embedding,
            validation.request_id(request.request_id, required=False),
        )
        (row,) = await self._creates.submit(user_id, (user_id,), arguments)
        if row["error_code"] is not None:
            raise errors.from_raised(row["error_code"], row["error_message"], row["error_column"] or "")
        document = row["document"]
        return pb.CreateMemoryResponse(memory=memory_message(document))

    async def GetMemory(self, request: pb.GetMemoryRequest, context: grpc.aio.ServicerContext) -> pb.GetMemoryResponse:
        user_id = self._owner(request.user_id)
        memory_id = _memory_id(request.memory_id, "memory_id")
        row = await self._db.fetchrow("get_memory", queries.GET_MEMORY, user_id, memory_id)
        if row is None:
            raise NotFound("memory not found", "memory_id")
        embedding = row["embedding"] if request.include_embedding else None
        return pb.GetMemoryResponse(memory=memory_message(row["document"], embedding))

    async def UpdateMemory(self, request: pb.UpdateMemoryRequest, context: grpc.aio.ServicerContext) -> pb.UpdateMemoryResponse:
        memory = request.memory
        user_id = self._owner(memory.user_id, "memory.user_id")
        memory_id = _memory_id(memory.memory_id, "memory.memory_id")
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
            "update_memory",
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
            value("gravity_score", lambda: validation.unit_interval(memory.gravity_score, "memory.gravity_score")),
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
        user_id = self._owner(request.user_id)
        memory_id = _memory_id(request.memory_id, "memory_id")
        await self._db.execute("delete_memory", queries.DELETE_MEMORY, user_id, memory_id)
        return pb.DeleteMemoryResponse()

    async def ListMemories(self, request: pb.ListMemoriesRequest, context: grpc.aio.ServicerContext) -> pb.ListMemoriesResponse:
        user_id = self._owner(request.user_id)
        limit = validation.page_size(request.page_size)
        scope = ("memories", user_id)
        after_time, after_id = self._tokens.decode_time_key(scope, request.page_token)
        documents = await self._db.fetch(
            "list_memories",
            queries.LIST_MEMORIES,
            user_id,
            _since(request),
            validation.unit_interval(request.min_gravity, "min_gravity"),
            validation.word(request.emotion_type, "emotion_type", required=False),
            validation.optional_opaque_id(request.thread_id, "thread_id"),
            validation.optional_opaque_id(request.session_id, "session_id"),
            validation.tags(request.tags_any, "tags_any") or None,
            request.identity_anchor_only,
            after_time,
            _memory_id(after_id, "page_token") if after_id is not None else None,
            limit + 1,
        )
        memories = [memory_message(row["d"]) for row in documents[:limit]]
        response = pb.ListMemoriesResponse(memories=memories)
        if len(documents) > limit:
            last = documents[limit - 1]["d"]
            response.next_page_token = self._tokens.encode_time_key(
                scope, datetime.datetime.fromisoformat(last["create_time"]), last["memory_id"]
            )
        return response

    async def SearchMemories(
        self, request: pb.SearchMemoriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchMemoriesResponse:
        """Text (BM25), vector, or hybrid, by which of query and embedding are
        given; with the embedder on, a query alone is embedded too."""
        user_id = self._owner(request.user_id)
        embedding = validation.embedding(request.embedding, "embedding", self._embedding_dim, required=False)
        query = validation.text(request.query, "query", MAX_QUERY_CHARS).strip() or None
        if query is None and embedding is None:
            raise InvalidArgument("query", "give a query, an embedding, or both")
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise InvalidArgument("top_k", f"must be 1-{MAX_TOP_K} (0 means {DEFAULT_TOP_K})")
        metric = validation.enum_value(request.metric, "metric", METRICS, default="cosine")
        min_gravity = validation.unit_interval(request.min_gravity, "min_gravity")
        emotion_type = validation.word(request.emotion_type, "emotion_type", required=False)
        recency_weight = validation.unit_interval(request.recency_weight, "recency_weight")
        gravity_weight = validation.unit_interval(request.gravity_weight, "gravity_weight")
        if recency_weight + gravity_weight > 1:
            raise InvalidArgument("gravity_weight", "recency_weight + gravity_weight must be at most 1")
        if embedding is None and query is not None and self._embedder is not None:
            embedding = await self._embedder.embed(query)
        rows = await self._db.fetch(
            "search_memories",
            queries.SEARCH_MEMORIES,
            user_id,
            embedding,
            query,
            metric,
            request.top_k or DEFAULT_TOP_K,
            min_gravity,
            _since(request),
            emotion_type,
            self._hybrid_vector_weight,
            self._exact_search_max,
            recency_weight,
            gravity_weight,
        )
        return pb.SearchMemoriesResponse(
            results=[
                pb.SearchResult(
                    memory=memory_message(r["document"]),
                    distance=r["distance"],
                    score=r["score"],
                    text_score=r["text_score"],
                )
                for r in rows
            ]
        )

    async def ListArcs(self, request: pb.ListArcsRequest, context: grpc.aio.ServicerContext) -> pb.ListArcsResponse:
        user_id = self._owner(request.user_id)
        limit = validation.page_size(request.page_size)
        scope = ("arcs", user_id)
        after_time, after_id = self._tokens.decode_time_key(scope, request.page_token)
        documents = await self._db.fetch(
            "list_arcs",
            queries.LIST_ARCS,
            user_id,
            after_time,
            _memory_id(after_id, "page_token") if after_id is not None else None,
            limit + 1,
        )
        response = pb.ListArcsResponse(arcs=[arc_message(row["d"]) for row in documents[:limit]])
        if len(documents) > limit:
            last = documents[limit - 1]["d"]
            response.next_page_token = self._tokens.encode_time_key(
                scope, datetime.datetime.fromisoformat(last["create_time"]), last["arc_id"]
            )
        return response

    async def SetIdentityEntities(
        self, request: pb.SetIdentityEntitiesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetIdentityEntitiesResponse:
        user_id = self._owner(request.user_id)
        names = validation.tags(request.entities, "entities", max_tags=MAX_ENTITIES, max_chars=MAX_ID_CHARS)
        distinct: dict[str, str] = {}
        for name in names:
            distinct.setdefault(name.lower(), name)  # the first spelling, in the order given
        entities = await self._db.fetchval(
            "set_identity_entities", queries.SET_IDENTITY_ENTITIES, user_id, list(distinct.values())
        )
        return pb.SetIdentityEntitiesResponse(entities=entities)

    # -- streams --------------------------------------------------------------

    async def SubscribeMemories(  # type: ignore[override]  # streams with context.write(), as grpc.aio allows
        self, request: pb.SubscribeMemoriesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._stream("memory", self._owner(request.user_id), request.resume_token, _memory_event, context)

    async def SubscribeArcs(  # type: ignore[override]  # streams with context.write(), as grpc.aio allows
        self, request: pb.SubscribeArcsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._stream("arc", self._owner(request.user_id), request.resume_token, _arc_event, context)

    async def _stream(
        self,
        topic: str,
        user_id: str,
        resume_token: str,
        render: Callable[[Mapping[str, Any], str], Any],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Sends the user's events of one topic after the resume position, then
        live ones. ``position`` is the last event number handled (of any topic:
        the log numbers both); each event is sent only when it is position + 1,
        so nothing is skipped or repeated. A gap in what the hub offers (it
        dropped events for a full buffer, or they committed before the feed
        started) is filled from the log."""
        scope = ("events", topic, user_id)
        start = self._tokens.decode_as(scope, resume_token, (int,), field="resume_token")
        with self._hub.subscribe(user_id) as subscription:
            row = await self._db.fetchrow("memory_stream_position", queries.MEMORY_STREAM_POSITION, user_id)
            assert row is not None
            self._hub.start_feed(user_id, row["last_event_seq"])
            if start is None:
                position = row["last_event_seq"]
            else:
                (position,) = start
                if position > row["last_event_seq"]:
                    raise InvalidArgument("resume_token", "ahead of this user's events (from another database?)")
                if position < row["purged_event_seq"]:
                    raise _resume_token_expired()
            await context.send_initial_metadata(((RESUME_TOKEN_METADATA, self._tokens.encode(scope, [position])),))

            async def send(event: Mapping[str, Any]) -> None:
                nonlocal position
                position = event["seq"]
                if event["topic"] == topic:
                    await context.write(render(event, self._tokens.encode(scope, [position])))

            while True:
                # From the log, until it has nothing newer.
                while True:
                    subscription.overflowed = False
                    events = await self._db.fetch(
                        "memory_events_after", queries.MEMORY_EVENTS_AFTER, [user_id], [position], READ_BATCH
                    )
                    for event in events:
                        if event["seq"] != position + 1:  # the log is gapless but for retention
                            raise _resume_token_expired()
                        await send(event)
                    if len(events) < READ_BATCH:
                        break
                # Live, until a gap.
                while (event := await subscription.next()) is not None and event["seq"] <= position + 1:
                    if event["seq"] == position + 1:
                        await send(event)

    async def PublishBroadcast(
        self, request: pb.PublishBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishBroadcastResponse:
        user_id = self._owner(request.user_id)
        event = validation.text(request.event, "event", MAX_EVENT_NAME_CHARS)
        if not event:
            raise InvalidArgument("event", "required")
        payload = validation.metadata(request.payload, "payload", max_bytes=MAX_BROADCAST_PAYLOAD_BYTES)
        message = json.dumps(
            {"user_id": user_id, "event": event, "payload": payload, "time_us": time.time_ns() // 1000},
            separators=(",", ":"),
        )
        await self._db.execute("publish_broadcast", queries.PUBLISH_BROADCAST, message)
        return pb.PublishBroadcastResponse()

    async def SubscribeBroadcasts(  # type: ignore[override]  # streams with context.write(), as grpc.aio allows
        self, request: pb.SubscribeBroadcastsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        user_id = self._owner(request.user_id)
        with self._hub.subscribe_broadcasts(user_id) as subscription:
            await context.send_initial_metadata(())
            while True:
                message = await subscription.next()
                if message is None:  # dropped for a full buffer: at most once
                    subscription.overflowed = False
                    continue
                response = pb.SubscribeBroadcastsResponse(event=message["event"])
                json_format.ParseDict(message["payload"], response.payload)
                response.event_time.FromMicroseconds(message["time_us"])
                await context.write(response)

    # -- sessions and patterns ------------------------------------------------

    async def TouchSession(self, request: pb.TouchSessionRequest, context: grpc.aio.ServicerContext) -> pb.TouchSessionResponse:
        user_id = self._owner(request.user_id)
        session_id = validation.opaque_id(request.session_id, "session_id")
        status = validation.enum_value(request.status, "status", SESSION_STATUS_NAMES, default="active")
        row = await self._db.fetchrow("touch_session", queries.TOUCH_SESSION, user_id, session_id, status)
        assert row is not None
        return pb.TouchSessionResponse(session=session_message(row))

    async def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        user_id = self._owner(request.user_id)
        limit = validation.page_size(request.page_size)
        status = validation.optional_enum_value(request.status, "status", SESSION_STATUS_NAMES)
        scope = ("sessions", user_id, status)
        after_time, after_id = self._tokens.decode_time_key(scope, request.page_token)
        rows = await self._db.fetch(
            "list_sessions", queries.LIST_SESSIONS, user_id, status, after_time, after_id, limit + 1
        )
        response = pb.ListSessionsResponse(sessions=[session_message(r) for r in rows[:limit]])
        if len(rows) > limit:
            last = rows[limit - 1]
            response.next_page_token = self._tokens.encode_time_key(scope, last["last_message_time"], last["session_id"])
        return response

    async def RecordPattern(
        self, request: pb.RecordPatternRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordPatternResponse:
        user_id = self._owner(request.user_id)
        pattern_type = validation.text(request.pattern_type, "pattern_type", 64)
        if not pattern_type:
            raise InvalidArgument("pattern_type", "required")
        intensity = validation.unit_interval(request.intensity, "intensity")
        row = await self._db.fetchrow("record_pattern", queries.RECORD_PATTERN, user_id, pattern_type, intensity)
        assert row is not None
        return pb.RecordPatternResponse(pattern=pattern_message(row))

    async def ListPatterns(self, request: pb.ListPatternsRequest, context: grpc.aio.ServicerContext) -> pb.ListPatternsResponse:
        user_id = self._owner(request.user_id)
        limit = validation.page_size(request.page_size)
        pattern_type = validation.text(request.pattern_type, "pattern_type", 64) or None
        scope = ("patterns", user_id, pattern_type)
        after = self._tokens.decode_as(scope, request.page_token, (float, str))
        rows = await self._db.fetch(
            "list_patterns", queries.LIST_PATTERNS, user_id, pattern_type, *(after or (None, None)), limit + 1
        )
        response = pb.ListPatternsResponse(patterns=[pattern_message(r) for r in rows[:limit]])
        if len(rows) > limit:
            last = rows[limit - 1]
            response.next_page_token = self._tokens.encode(scope, [last["intensity"], last["pattern_type"]])
        return response
