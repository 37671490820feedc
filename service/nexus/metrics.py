"""Prometheus metrics, named as go-grpc-prometheus / py-grpc-prometheus name
them so stock gRPC dashboards and alerts work unchanged, plus stream and
database pool gauges. Served on NEXUS_METRICS_PORT when set.

- ``grpc_server_started_total`` / ``grpc_server_handled_total`` (with
  ``grpc_code``): calls started and finished, by service, method and type.
- ``grpc_server_handling_seconds``: latency of unary calls only. A stream lives
  for minutes or days, so its lifetime goes to ``nexus_stream_duration_seconds``
  instead of swamping the latency buckets.
- ``grpc_server_msg_received_total`` / ``grpc_server_msg_sent_total``: messages
  per call (1 each for a unary call, every write of a server stream).
- ``nexus_streams_open``: server streams open now.
- ``nexus_group_commit_batch_items``: items per group-commit database call, by
  batch function (``nexus.group_commit``): how well concurrent writes coalesce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LABELS = ["grpc_type", "grpc_service", "grpc_method"]

STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, regardless of success or failure.", [*_LABELS, "grpc_code"]
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of unary RPCs handled by the server (streams: nexus_stream_duration_seconds).",
    _LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
MSG_RECEIVED = Counter("grpc_server_msg_received_total", "RPC messages received on the server.", _LABELS)
MSG_SENT = Counter("grpc_server_msg_sent_total", "RPC messages sent by the server.", _LABELS)
STREAM_SECONDS = Histogram(
    "nexus_stream_duration_seconds",
    "How long server streams stayed open.",
    _LABELS,
    buckets=(0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 6 * 3600.0, 24 * 3600.0),
)
STREAMS_OPEN = Gauge("nexus_streams_open", "Server streams open now.", _LABELS)
GROUP_COMMIT_BATCH_ITEMS = Histogram(
    "nexus_group_commit_batch_items",
    "Items per group-commit database call.",
    ["function"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class MethodMetrics:
    """One method's metric children, resolved once so a call only increments."""

    __slots__ = ("streaming", "started", "received", "sent", "duration", "open", "_handled_labels", "_handled")

    def __init__(self, full_method: str, grpc_type: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        labels = (grpc_type, service, method)
        self.streaming = grpc_type != "unary"
        self.started = STARTED.labels(*labels)
        self.received = MSG_RECEIVED.labels(*labels)
        self.sent = MSG_SENT.labels(*labels)
        self.duration = (STREAM_SECONDS if self.streaming else HANDLING_SECONDS).labels(*labels)
        self.open = STREAMS_OPEN.labels(*labels)
        self._handled_labels = labels
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = HANDLED.labels(*self._handled_labels, code.name)
        return child


class PoolCollector(Collector):
    """Reads the live pool's size on each scrape."""

    def __init__(self, pool: Callable[[], asyncpg.Pool | None]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self._pool()
        if pool is None:
            return
        size = GaugeMetricFamily("nexus_db_pool_connections", "Open database connections.")
        size.add_metric([], pool.get_size())
        idle = GaugeMetricFamily("nexus_db_pool_idle_connections", "Idle database connections.")
        idle.add_metric([], pool.get_idle_size())
        limit = GaugeMetricFamily("nexus_db_pool_max_connections", "Most database connections allowed.")
        limit.add_metric([], pool.get_max_size())
        yield from (size, idle, limit)


def serve_metrics(host: str, port: int, pool: Callable[[], asyncpg.Pool | None]) -> Callable[[], None]:
    """Starts the /metrics HTTP endpoint; returns a function that stops it."""
    server, thread = start_http_server(port, addr=host)  # first: a port in use leaves nothing registered
    collector = PoolCollector(pool)
    REGISTRY.register(collector)

    def stop() -> None:
        server.shutdown()
        thread.join()
        REGISTRY.unregister(collector)

    return stop
