"""SearchMemories of nexus.v1.MemoryService: text (BM25), vector or hybrid
search over one user's memories (the ranking lives in db/functions/search.sql)."""

from __future__ import annotations

import grpc

from nexus import queries, validation
from nexus.auth import acting_user
from nexus.database import Database
from nexus.embedder import Embedder
from nexus.errors import InvalidArgument
from nexus.servicers.memory_messages import memory_message
from nexus.v1 import memory_pb2 as pb

METRICS = {pb.DISTANCE_METRIC_COSINE: "cosine", pb.DISTANCE_METRIC_L2: "l2"}
MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_QUERY_CHARS = 1000


class MemorySearch:
    """SearchMemories."""

    _db: Database
    _embedding_dim: int
    _embedder: Embedder | None
    _hybrid_vector_weight: float
    _exact_search_max: int

    async def SearchMemories(
        self, request: pb.SearchMemoriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchMemoriesResponse:
        """Text (BM25), vector, or hybrid, by which of query and embedding are
        given; with the embedder on, a query alone is embedded too."""
        user_id = acting_user(request.user_id)
        embedding = validation.embedding(request.embedding, "embedding", self._embedding_dim, required=False)
        query = validation.text(request.query, "query", MAX_QUERY_CHARS).strip() or None
        if query is None and embedding is None:
            raise InvalidArgument("query", "give a query, an embedding, or both")
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise InvalidArgument("top_k", f"must be 1-{MAX_TOP_K} (0 means {DEFAULT_TOP_K})")
        metric = validation.enum_value(request.metric, "metric", METRICS, default="cosine")
        min_gravity = validation.unit_interval(request.min_gravity, "min_gravity")
        emotion_type = validation.word(request.emotion_type, "emotion_type", required=False)
        recency_weight = validation.score(request.recency_weight, "recency_weight")
        gravity_weight = validation.score(request.gravity_weight, "gravity_weight")
        if recency_weight + gravity_weight > 1:
            raise InvalidArgument("gravity_weight", "recency_weight + gravity_weight must be at most 1")
        if embedding is None and query is not None and self._embedder is not None:
            embedding = await self._embedder.embed(query)
        rows = await self._db.fetch(
            queries.SEARCH_MEMORIES,
            user_id,
            embedding,
            query,
            metric,
            request.top_k or DEFAULT_TOP_K,
            min_gravity,
            validation.optional_timestamp(request, "since"),
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
