"""Memories and vectors: float32 values as the wire carries them, random vectors,
distances, and a memory created through the API."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Sequence
from typing import Any

from nexus.constants import DEFAULT_EMBEDDING_DIM
from nexus.v1 import memory_pb2, memory_pb2_grpc

from support.rpc import auth


def f32(values: Sequence[float]) -> list[float]:
    """The values as the float32s they become on the wire (repeated float)."""
    return list(struct.unpack(f"{len(values)}f", struct.pack(f"{len(values)}f", *values)))


def random_vector(
    rng: random.Random,
    dim: int = DEFAULT_EMBEDDING_DIM,
    center: Sequence[float] | None = None,
    spread: float = 1.0,
) -> list[float]:
    """A float32 vector spread around ``center`` (the origin by default)."""
    center = center or [0.0] * dim
    return f32([c + rng.gauss(0, spread) for c in center])


def distance(a: Sequence[float], b: Sequence[float], metric: int) -> float:
    if metric == memory_pb2.DISTANCE_METRIC_L2:
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def create(
    stub: memory_pb2_grpc.MemoryServiceStub, user: str, content: str, embedding: Sequence[float] = (), **fields: Any
) -> memory_pb2.Memory:
    request = memory_pb2.CreateMemoryRequest(user_id=user, content=content, embedding=embedding, **fields)
    return (await stub.CreateMemory(request, metadata=auth(user))).memory
