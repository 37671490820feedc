"""Settings of a Nexus process.

Every setting has a documented default, an environment variable ``NEXUS_<NAME>``
and a command-line flag ``--<name>`` (flags win over the environment). The
field list below is the single source: the CLI builds its flags from it, and
docs/configuration.md is generated from it (``scripts/gen_config_doc.py``; a
unit test fails when the document is stale). Each field's ``help`` is its flag's
help text; an optional ``doc`` adds what only the document says, and
``default_doc`` describes a default that is computed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from nexus.constants import DEFAULT_EMBEDDING_DIM

POSTGRES_INTEGER_MAX = 2**31 - 1


def default_data_dir() -> Path:
    """Per-user data directory: $XDG_DATA_HOME/nexus or ~/.local/share/nexus."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nexus"


# Worker processes by default: the cores, but at most this many. Each worker has its
# own pool (pool_max_size connections, plus its stream listener and its health
# probe): 4 x (16 + 2) = 72 fit PostgreSQL's default max_connections of 100, and
# the embedded PostgreSQL on the same machine needs cores of its own.
DEFAULT_WORKERS_MAX = 4
CGROUP_CPU_LIMIT = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, and a container's CPU
    quota (cgroup v2 cpu.max, rounded up) when there is one."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = CGROUP_CPU_LIMIT.read_text().split()  # "max 100000" when unlimited: ValueError
        cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(1, cores)


def default_workers() -> int:
    return min(available_cores(), DEFAULT_WORKERS_MAX)


# The embedders a server can run, and the dimension each makes (None: no embedder).
EMBEDDER_DIMENSIONS: dict[str, int | None] = {"none": None, "wordllama": 256}


@dataclass(frozen=True)
class Config:
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address the gRPC server listens on.", "doc": "The container image sets 0.0.0.0."},
    )
    port: int = field(default=50051, metadata={"help": "gRPC port; 0 picks a free one."})
    workers: int = field(
        default_factory=default_workers,
        metadata={
            "help": f"Server processes sharing the port (the kernel splits connections between them); 1 serves in "
            f"one process. Each worker has its own pool, so pool sizes are per worker: up to workers x "
            f"(pool_max_size + 2) database connections. The default, the cores available, is capped at "
            f"{DEFAULT_WORKERS_MAX}: {DEFAULT_WORKERS_MAX} x (16 + 2) fit PostgreSQL's default max_connections "
            f"(100), and the database needs cores too.",
            "doc": "The parent process starts the embedded database and migrates once, replaces a worker that "
            "exits, and stops them all on SIGTERM/SIGINT (docs/operations.md).",
            "default_doc": f"the cores available (CPU affinity, a cgroup CPU quota), at most {DEFAULT_WORKERS_MAX}",
        },
    )
    reuse_port: bool = field(
        default=False,
        metadata={
            "help": "Share the port with other servers that set it too (SO_REUSEPORT: the kernel splits "
            "connections). Off, a port in use is an error."
        },
    )
    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata={
            "help": "Directory of the embedded PostgreSQL and the generated JWT secret.",
            "default_doc": "`$XDG_DATA_HOME/nexus`, else `~/.local/share/nexus`",
        },
    )
    database_url: str = field(
        default="",
        metadata={
            "help": "External PostgreSQL URL; when set, no embedded database is started.",
            "doc": "PostgreSQL 16 or later with pgvector, or a Citus coordinator (docs/citus.md).",
        },
    )
    citus_without_workers: bool = field(
        default=False,
        metadata={
            "help": "Migrate a database that has the citus extension but no active worker, keeping its tables "
            "on the coordinator. Off, such a database is refused: its workers are missing (docs/citus.md)."
        },
    )
    jwt_secret: str = field(
        default="",
        metadata={
            "help": "HS256 secret for bearer tokens. Unset with the embedded database: generated into the "
            "data directory."
        },
    )
    jwt_public_key_file: str = field(
        default="", metadata={"help": "PEM public key file; when set, RS256 tokens are accepted too."}
    )
    jwt_leeway_s: float = field(
        default=30.0,
        metadata={"help": "Clock skew allowed on a token's exp, nbf and iat, in seconds.", "doc": "0 to 300."},
    )
    jwt_max_lifetime_s: float = field(
        default=0.0,
        metadata={"help": "Longest token lifetime (exp - iat) accepted, in seconds; tokens must then carry iat. 0 = no cap."},
    )
    metrics_port: int = field(
        default=0,
        metadata={
            "help": "Prometheus metrics port; 0 = off. With several workers, worker i (0, 1, ...) serves its own "
            "metrics on this port + i.",
            "doc": "Serves `/metrics`; the metrics are listed in docs/operations.md.",
        },
    )
    pool_min_size: int = field(default=2, metadata={"help": "Database connections kept open, per worker."})
    pool_max_size: int = field(default=16, metadata={"help": "Most database connections at once, per worker."})
    statement_timeout_ms: int = field(
        default=30_000,
        metadata={"help": "Ceiling on any one database call; a shorter client deadline wins."},
    )
    slow_query_warn_ms: int = field(default=500, metadata={"help": "Log a warning for database calls slower than this."})
    slow_query_error_ms: int = field(default=1000, metadata={"help": "Log an error for database calls slower than this."})
    max_pending_rpcs: int = field(
        default=10_000,
        metadata={
            "help": "Calls gRPC queues before a handler takes them; beyond it calls are refused, not dropped.",
            "doc": "Refused means RESOURCE_EXHAUSTED, never a silent cancel.",
        },
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata={"help": "Seconds in-flight calls may take to finish after SIGTERM/SIGINT."}
    )
    tls_cert_file: str = field(default="", metadata={"help": "PEM certificate chain; with tls_key_file enables TLS."})
    tls_key_file: str = field(default="", metadata={"help": "PEM private key of tls_cert_file."})
    tls_client_ca_file: str = field(
        default="", metadata={"help": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."}
    )
    tls_ca_file: str = field(
        default="",
        metadata={
            "help": "Client commands (health, seed): PEM CA bundle the server's certificate must chain to. "
            "They connect with TLS when this, tls_client_cert_file or the server's tls_cert_file is set "
            "(trusting the system's CAs when this is unset)."
        },
    )
    tls_client_cert_file: str = field(
        default="",
        metadata={"help": "Client commands: PEM certificate chain to present to an mTLS server; with tls_client_key_file."},
    )
    tls_client_key_file: str = field(default="", metadata={"help": "Client commands: PEM private key of tls_client_cert_file."})
    tls_server_name: str = field(
        default="",
        metadata={
            "help": "Client commands: the name the server's certificate must carry when it is not the host connected "
            "to (e.g. 127.0.0.1 inside the container)."
        },
    )
    embedding_dim: int = field(
        default=DEFAULT_EMBEDDING_DIM,
        metadata={"help": "Dimension of memory embeddings; fixed when the database is first migrated."},
    )
    search_exact_max_memories: int = field(
        default=2_000,
        metadata={
            "help": "SearchMemories scans a user's memories exactly up to this many (a scan costs about 1 ms per "
            "1000 memories of 384 dimensions); maintenance gives a user with more a vector index of their own "
            "(IVFFlat, cosine; the vector_index_max_users largest such users), which answers once built."
        },
    )
    vector_index_max_users: int = field(
        default=50,
        metadata={
            "help": "Maintenance keeps a vector index of their own for at most this many users, the largest above "
            "search_exact_max_memories (an index stays until its user falls to 80% of it, while no user above "
            "wants its place); the others are searched exactly. Every index on memories costs every query and "
            "write on it a lock and a look."
        },
    )
    embedder: str = field(
        default="none",
        metadata={
            "help": "Server-side embeddings: none, or wordllama (offline, 256 dimensions: needs embedding_dim 256 "
            "and the wordllama extra). On: memories stored without an embedding and text-only searches get one."
        },
    )
    hybrid_vector_weight: float = field(
        default=0.3,
        metadata={"help": "Weight of the vector side in hybrid search (0..1); the text side gets the rest."},
    )
    stream_buffer_events: int = field(
        default=1024,
        metadata={"help": "Events buffered per stream; a stream that falls further behind is served from the table."},
    )
    event_retention_hours: float = field(
        default=72.0, metadata={"help": "How long stream events are kept for resuming (at least 24)."}
    )
    idempotency_retention_hours: float = field(
        default=168.0, metadata={"help": "How long a CreateMemory request_id is remembered."}
    )
    feed_retention_days: float = field(
        default=30.0,
        metadata={"help": "How far back a home feed reaches (at least 1); maintenance removes older feed "
                          "activities and their copies in readers' feeds."},
    )
    maintenance_interval_s: float = field(
        default=60.0, metadata={"help": "How often maintenance runs (on one replica at a time)."}
    )
    pending_expiry_interval_s: float = field(
        default=0.25,
        metadata={"help": "How often each replica voids the pending transfers whose timeout has passed "
                          "(soonest first, each once across replicas)."},
    )
    log_level: str = field(
        default="info",
        metadata={"help": "debug, info, warning or error.", "doc": "At info, one structured line per RPC (stderr)."},
    )

    @property
    def embedded(self) -> bool:
        return not self.database_url

    @property
    def client_tls(self) -> bool:
        """Whether client commands connect with TLS: any client TLS setting, or the server's own certificate."""
        return bool(self.tls_ca_file or self.tls_client_cert_file or self.tls_cert_file)

    @property
    def listen_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # Settings reach SQL as integer parameters: a larger one would fail every call that sends it.
            if type(value) is int and abs(value) > POSTGRES_INTEGER_MAX:
                raise ValueError(f"{f.name} must fit a PostgreSQL integer (at most {POSTGRES_INTEGER_MAX})")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if bool(self.tls_client_cert_file) != bool(self.tls_client_key_file):
            raise ValueError("tls_client_cert_file and tls_client_key_file must be set together")
        if self.tls_server_name and not self.client_tls:
            raise ValueError("tls_server_name needs TLS: set tls_ca_file")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not 0 < self.pool_min_size <= self.pool_max_size:
            raise ValueError("need 0 < pool_min_size <= pool_max_size")
        if not 1 <= self.embedding_dim <= 2000:
            raise ValueError("embedding_dim must be 1-2000 (the most an HNSW index takes)")
        if self.embedder not in EMBEDDER_DIMENSIONS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDER_DIMENSIONS)}")
        if EMBEDDER_DIMENSIONS[self.embedder] not in (None, self.embedding_dim):
            raise ValueError(
                f"embedder {self.embedder} makes {EMBEDDER_DIMENSIONS[self.embedder]}-dimensional embeddings: "
                f"set embedding_dim to {EMBEDDER_DIMENSIONS[self.embedder]}"
            )
        if not 0 <= self.hybrid_vector_weight <= 1:
            raise ValueError("hybrid_vector_weight must be 0..1")
        if self.search_exact_max_memories < 0 or self.vector_index_max_users < 0:
            raise ValueError("search_exact_max_memories and vector_index_max_users must not be negative")
        if self.feed_retention_days < 1:
            raise ValueError("feed_retention_days must be at least 1")
        if self.event_retention_hours < 24:
            raise ValueError("event_retention_hours must be at least 24")
        if self.stream_buffer_events < 1:
            raise ValueError("stream_buffer_events must be at least 1")
        if not 0 <= self.jwt_leeway_s <= 300:
            raise ValueError("jwt_leeway_s must be 0-300")
        if self.jwt_max_lifetime_s < 0:
            raise ValueError("jwt_max_lifetime_s must not be negative (0 = no cap)")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")


def env_var(name: str) -> str:
    return f"NEXUS_{name.upper()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per Config field; the environment supplies the defaults."""
    for f in dataclasses.fields(Config):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} [env {env_var(f.name)}]".replace("%", "%%"),  # argparse formats help with %
        )


def parse_bool(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, not {raw!r}")


def from_sources(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> Config:
    """Builds a Config from flags, then environment variables, then defaults."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, object] = {}
    for f in dataclasses.fields(Config):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(env_var(f.name))
        if raw is None or raw == "":
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "int":
            values[f.name] = int(raw)
        elif kind == "float":
            values[f.name] = float(raw)
        elif kind == "bool":
            values[f.name] = parse_bool(f.name, raw)
        elif kind == "Path":
            values[f.name] = Path(raw).expanduser()
        else:
            values[f.name] = raw
    config = Config(**values)  # type: ignore[arg-type]
    config.validate()
    return config
