"""``python -m bench`` (``make bench``): load figures for Nexus, measured in one run.

By default the bench starts its own server on 127.0.0.1 over a fresh database
in a temporary directory (the embedded PostgreSQL; for ``--suite cluster`` also
a coordinator + 2 workers Citus cluster) and removes them afterwards, on
failure and Ctrl-C too: bench data never lands in a database the bench did not
create. ``--disposable-database`` benches the configured server and writes into
the configured database instead, which the flag declares disposable.

Settings (embedding dimension, pool sizes ...) come from the same flags and
``NEXUS_*`` variables as ``nexus serve`` (nexus.config); the bench's own
servers run with them. The figures are printed on stdout at the end, and only
when every call succeeded: a server it cannot reach, or any failed call, ends
the run with one line on stderr ("bench failed: ...") and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import asyncpg
import grpc

from bench.cluster import run_cluster
from bench.core import BenchFailed, Report
from bench.feed import run_feed
from bench.interactions import run_interactions
from bench.ledger import run_ledger
from bench.memory import run_memory
from bench.targets import configured_target, single_node
from bench.workload import Workload
from devtools.citus_build import CitusBuildError
from devtools.citus_cluster import CitusClusterError
from nexus import config as config_module
from nexus.cli.client import describe_rpc_error
from nexus.config import Config

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("interactions", "ledger", "feed", "memory", "search", "all", "cluster"),
                        default="all",
                        help="Which figures: all = interactions, ledger, feed, then memory; ledger = batches, "
                        "pending transfers and their expiry; feed = home feed pages, delivery and fan-out; search = "
                        "the memory suite's search figures only; cluster = single node vs a 3-node Citus cluster "
                        "(needs NEXUS_CITUS_SOURCE, see docs/citus.md).")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per timed scenario.")
    parser.add_argument("--concurrency", type=int, default=64, help="Calls in flight per scenario.")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="Multiplies the data sizes (100k entries, 10k payers, 200k memories ...); 0.01 for a "
                        "smoke run.")
    parser.add_argument("--event-rate", type=int, default=1000, help="Events/s written during the delivery test.")
    parser.add_argument(
        "--disposable-database", action="store_true",
        help="Bench the server at --host/--port instead, writing bench data into the configured database "
        "(NEXUS_DATABASE_URL or --data-dir), which this flag declares disposable.",
    )
    parser.add_argument("--server-pid", type=int, help="With --disposable-database: the server's pid, for its CPU "
                        "per call and its memory with idle streams.")
    config_module.add_arguments(parser)
    return parser


async def run(config: Config, args: argparse.Namespace) -> None:
    """Runs the suite; prints the figures only once all of it has succeeded."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # stop the bench's servers on the way out, as for Ctrl-C
    workload = Workload.scaled(args.scale, config.embedding_dim)
    report = Report()
    if args.suite == "cluster":
        await run_cluster(config, workload, args.duration, args.concurrency, report)
    else:
        target_context = (configured_target(config, args.server_pid) if args.disposable_database
                          else single_node(config))
        async with target_context as target:
            try:
                if args.suite in ("interactions", "all"):
                    await run_interactions(target, config, workload, args.duration, args.concurrency, report)
                if args.suite in ("ledger", "all"):
                    if report.lines:
                        report.add()
                    await run_ledger(target, workload, args.duration, args.concurrency, args.scale, report)
                if args.suite in ("feed", "all"):
                    if report.lines:
                        report.add()
                    await run_feed(target, args.duration, args.concurrency, args.scale, report)
                if args.suite in ("memory", "search", "all"):
                    if report.lines:
                        report.add()
                    await run_memory(target, config, workload, args.scale, args.duration, args.concurrency,
                                     args.event_rate, report, search_only=args.suite == "search")
            except grpc.aio.AioRpcError as exc:
                raise BenchFailed(describe_rpc_error(target.address, exc)) from None
    report.print()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite == "cluster" and args.disposable_database:
        parser.error("--suite cluster runs its own single node and cluster; it does not take --disposable-database")
    if args.duration <= 0 or args.concurrency < 1 or args.scale <= 0 or args.event_rate < 1:
        parser.error("--duration, --concurrency, --scale and --event-rate must be positive")
    try:
        config = config_module.from_sources(args)
    except ValueError as exc:
        print(f"bench: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    import uvloop

    try:
        uvloop.run(run(config, args))
    except BenchFailed as exc:
        print(exc, file=sys.stderr)
    except (OSError, asyncpg.PostgresError, CitusBuildError, CitusClusterError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; its servers and databases are stopped and removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    else:
        return 0
    return EXIT_FAILED


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
