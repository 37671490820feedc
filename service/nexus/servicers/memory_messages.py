"""Rows and documents of the memory store as nexus.v1 messages, and the
enum names the database uses for the proto enums."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from nexus.pagination import time_key
from nexus.v1 import memory_pb2 as pb

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


def memory_event(row: Mapping[str, Any], resume_token: str) -> pb.SubscribeMemoriesResponse:
    return pb.SubscribeMemoriesResponse(
        type=EVENT_TYPES[row["change"]],
        memory=memory_message(row["document"]),
        resume_token=resume_token,
        event_time=_timestamp(row["create_time"]),
    )


def arc_event(row: Mapping[str, Any], resume_token: str) -> pb.SubscribeArcsResponse:
    return pb.SubscribeArcsResponse(
        type=EVENT_TYPES[row["change"]],
        arc=arc_message(row["document"]),
        resume_token=resume_token,
        event_time=_timestamp(row["create_time"]),
    )


def document_position(document: Mapping[str, Any], key: str) -> list[Any]:
    """Where a memory or arc document stands in a list ordered by (create_time,
    ``key``): the position a page token names."""
    return time_key(datetime.datetime.fromisoformat(document["create_time"]), document[key])
