"""The streaming RPCs of nexus.v1.MemoryService: a user's memory and arc
events, and broadcasts.

The stream protocol (catch up from the event log, then live, back to the log
after a gap) is ``nexus.realtime``'s; this part turns positions into resume
tokens and events into messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format

from nexus import queries, validation
from nexus.auth import acting_user
from nexus.database import Database
from nexus.errors import InvalidArgument
from nexus.pagination import PageTokens
from nexus.realtime import EventHub
from nexus.servicers.memory_messages import arc_event, memory_event
from nexus.v1 import memory_pb2 as pb

MAX_EVENT_NAME_CHARS = 64
# NOTIFY carries at most 8000 bytes; the envelope needs the rest.
MAX_BROADCAST_PAYLOAD_BYTES = 7000
# Initial metadata of a stream: the position it started at, as a resume token.
RESUME_TOKEN_METADATA = "x-nexus-resume-token"


class MemoryStreams:
    """SubscribeMemories, SubscribeArcs, PublishBroadcast, SubscribeBroadcasts."""

    _db: Database
    _tokens: PageTokens
    _hub: EventHub

    async def SubscribeMemories(self, request: pb.SubscribeMemoriesRequest, context: grpc.aio.ServicerContext) -> None:
        await self._stream("memory", acting_user(request.user_id), request.resume_token, memory_event, context)

    async def SubscribeArcs(self, request: pb.SubscribeArcsRequest, context: grpc.aio.ServicerContext) -> None:
        await self._stream("arc", acting_user(request.user_id), request.resume_token, arc_event, context)

    async def _stream(
        self,
        topic: str,
        user_id: str,
        resume_token: str,
        render: Callable[[Mapping[str, Any], str], Any],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Sends the user's events of one topic after the resume token's
        position (now, without one), each with the token of its own position.
        The log numbers both topics in one sequence, so a token of either
        topic's stream names a position in it."""
        scope = ("events", topic, user_id)
        start = self._tokens.decode_as(scope, resume_token, (int,), field="resume_token")
        async with self._hub.events(user_id, None if start is None else start[0]) as events:
            await context.send_initial_metadata(((RESUME_TOKEN_METADATA, self._tokens.encode(scope, [events.position])),))
            async for event in events:
                if event["topic"] == topic:
                    await context.write(render(event, self._tokens.encode(scope, [event["seq"]])))

    async def PublishBroadcast(
        self, request: pb.PublishBroadcastRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishBroadcastResponse:
        user_id = acting_user(request.user_id)
        event = validation.text(request.event, "event", MAX_EVENT_NAME_CHARS)
        if not event:
            raise InvalidArgument("event", "required")
        payload = validation.metadata(request.payload, "payload", max_bytes=MAX_BROADCAST_PAYLOAD_BYTES)
        message = json.dumps(
            {"user_id": user_id, "event": event, "payload": payload, "time_us": time.time_ns() // 1000},
            separators=(",", ":"),
        )
        await self._db.execute(queries.PUBLISH_BROADCAST, message)
        return pb.PublishBroadcastResponse()

    async def SubscribeBroadcasts(self, request: pb.SubscribeBroadcastsRequest, context: grpc.aio.ServicerContext) -> None:
        user_id = acting_user(request.user_id)
        async with self._hub.broadcasts(user_id) as messages:
            await context.send_initial_metadata(())
            async for message in messages:
                response = pb.SubscribeBroadcastsResponse(event=message["event"])
                json_format.ParseDict(message["payload"], response.payload)
                response.event_time.FromMicroseconds(message["time_us"])
                await context.write(response)
