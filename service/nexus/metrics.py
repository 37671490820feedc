"""Prometheus metrics: per-method call counts by status code, latency
histograms, and database pool gauges. Served on NEXUS_METRICS_PORT when set."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import asyncpg
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RPC_CALLS = Counter("nexus_rpc_calls_total", "RPCs handled, by method and status code.", ["method", "code"])
RPC_LATENCY = Histogram(
    "nexus_rpc_duration_seconds",
    "RPC handling time, by method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


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
    collector = PoolCollector(pool)
    REGISTRY.register(collector)
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        thread.join()
        REGISTRY.unregister(collector)

    return stop
