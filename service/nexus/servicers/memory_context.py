"""The context nexus.v1.MemoryService keeps around a user's memories: arcs
(built by the database from the memories, db/functions/memories.sql), sessions and
patterns (recorded by the caller)."""

from __future__ import annotations

import grpc

from nexus import queries, validation
from nexus.auth import acting_user
from nexus.database import Database
from nexus.errors import InvalidArgument
from nexus.pagination import PageTokens, time_key
from nexus.servicers.memory_messages import (
    SESSION_STATUS_NAMES,
    arc_message,
    document_position,
    pattern_message,
    session_message,
)
from nexus.v1 import memory_pb2 as pb

MAX_PATTERN_TYPE_CHARS = 64


class MemoryContext:
    """ListArcs, TouchSession, ListSessions, RecordPattern, ListPatterns."""

    _db: Database
    _tokens: PageTokens

    async def ListArcs(self, request: pb.ListArcsRequest, context: grpc.aio.ServicerContext) -> pb.ListArcsResponse:
        user_id = acting_user(request.user_id)
        limit = validation.page_size(request.page_size)
        scope = ("arcs", user_id)
        after_time, after_id = self._tokens.decode_time_key(scope, request.page_token)
        documents = await self._db.fetch(
            queries.LIST_ARCS,
            user_id,
            after_time,
            validation.memory_id(after_id, "page_token") if after_id is not None else None,
            limit + 1,
        )
        page, next_page_token = self._tokens.page(
            scope, documents, limit, lambda row: document_position(row["d"], "arc_id")
        )
        return pb.ListArcsResponse(arcs=[arc_message(row["d"]) for row in page], next_page_token=next_page_token)

    async def TouchSession(self, request: pb.TouchSessionRequest, context: grpc.aio.ServicerContext) -> pb.TouchSessionResponse:
        user_id = acting_user(request.user_id)
        session_id = validation.opaque_id(request.session_id, "session_id")
        status = validation.enum_value(request.status, "status", SESSION_STATUS_NAMES, default="active")
        row = await self._db.fetchone(queries.TOUCH_SESSION, user_id, session_id, status)
        return pb.TouchSessionResponse(session=session_message(row))

    async def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        user_id = acting_user(request.user_id)
        limit = validation.page_size(request.page_size)
        status = validation.optional_enum_value(request.status, "status", SESSION_STATUS_NAMES)
        scope = ("sessions", user_id, status)
        after_time, after_id = self._tokens.decode_time_key(scope, request.page_token)
        rows = await self._db.fetch(
            queries.LIST_SESSIONS, user_id, status, after_time, after_id, limit + 1
        )
        page, next_page_token = self._tokens.page(
            scope, rows, limit, lambda row: time_key(row["last_message_time"], row["session_id"])
        )
        return pb.ListSessionsResponse(sessions=[session_message(r) for r in page], next_page_token=next_page_token)

    async def RecordPattern(
        self, request: pb.RecordPatternRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordPatternResponse:
        user_id = acting_user(request.user_id)
        pattern_type = validation.text(request.pattern_type, "pattern_type", MAX_PATTERN_TYPE_CHARS)
        if not pattern_type:
            raise InvalidArgument("pattern_type", "required")
        intensity = validation.unit_interval(request.intensity, "intensity")
        row = await self._db.fetchone(queries.RECORD_PATTERN, user_id, pattern_type, intensity)
        return pb.RecordPatternResponse(pattern=pattern_message(row))

    async def ListPatterns(self, request: pb.ListPatternsRequest, context: grpc.aio.ServicerContext) -> pb.ListPatternsResponse:
        user_id = acting_user(request.user_id)
        limit = validation.page_size(request.page_size)
        pattern_type = validation.text(request.pattern_type, "pattern_type", MAX_PATTERN_TYPE_CHARS) or None
        scope = ("patterns", user_id, pattern_type)
        after = self._tokens.decode_as(scope, request.page_token, (float, str))
        rows = await self._db.fetch(
            queries.LIST_PATTERNS, user_id, pattern_type, *(after or (None, None)), limit + 1
        )
        page, next_page_token = self._tokens.page(
            scope, rows, limit, lambda row: [row["intensity"], row["pattern_type"]]
        )
        return pb.ListPatternsResponse(patterns=[pattern_message(r) for r in page], next_page_token=next_page_token)
