"""How the operator commands reach a running server and the configured database.

``nexus health``, ``seed`` and ``token`` talk to a server; ``migrate`` and
``reconcile`` to its database; the bench (``python -m bench``) to both. One place decides the
address, the channel (plaintext, TLS or mTLS from the ``tls_*`` settings), the
token and the database URL, and turns what goes wrong into one line an operator
can act on (:class:`ClientError`) instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc

from nexus import database, embedded
from nexus.auth import SECRET_FILE_NAME, mint_token, resolve_secret
from nexus.config import Config


class ClientError(Exception):
    """A client command cannot do its work; the message is the one line printed."""


def server_address(config: Config) -> str:
    """host:port of the server; a wildcard listen address means this machine."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {setting} {path}: {exc.strerror}") from None


def channel_credentials(config: Config) -> grpc.ChannelCredentials | None:
    """TLS credentials from the client settings, or None for plaintext (see Config.client_tls)."""
    if not config.client_tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("tls_ca_file", config.tls_ca_file) if config.tls_ca_file else None,
        private_key=_read("tls_client_key_file", config.tls_client_key_file) if config.tls_client_key_file else None,
        certificate_chain=(
            _read("tls_client_cert_file", config.tls_client_cert_file) if config.tls_client_cert_file else None
        ),
    )


def open_channel(config: Config) -> grpc.aio.Channel:
    """A channel to the configured server, with TLS when the client settings ask for it."""
    credentials = channel_credentials(config)
    if credentials is None:
        return grpc.aio.insecure_channel(server_address(config))
    options = [("grpc.ssl_target_name_override", config.tls_server_name)] if config.tls_server_name else []
    return grpc.aio.secure_channel(server_address(config), credentials, options=options)


def client_secret(config: Config) -> str:
    """The HS256 secret the server checks tokens with; never creates one.

    With the embedded database the server generates it into its data
    directory on first start: a secret made up here would mint tokens that no
    server accepts.
    """
    if config.jwt_secret:
        return config.jwt_secret
    if not config.embedded:
        raise ClientError("no JWT secret: set NEXUS_JWT_SECRET (or --jwt-secret) to the server's")
    if not (config.data_dir / SECRET_FILE_NAME).is_file():
        raise ClientError(
            f"no JWT secret in {config.data_dir}: no server has run with this data directory "
            "(set --data-dir / NEXUS_DATA_DIR to the server's, or NEXUS_JWT_SECRET)"
        )
    return resolve_secret(config)


def service_metadata(config: Config, subject: str) -> tuple[tuple[str, str], ...]:
    """Call metadata with a short-lived service token for `subject`."""
    return (("authorization", f"Bearer {mint_token(client_secret(config), subject, service=True)}"),)


def describe_rpc_error(address: str, error: grpc.aio.AioRpcError) -> str:
    """One line for a failed call; UNAVAILABLE says what to check."""
    code = error.code().name
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach {address} ({code}: {error.details()}): is `nexus serve` running there, with matching TLS settings?"
    return f"{address}: {code}: {error.details()}"


@contextlib.contextmanager
def database_url(config: Config, *, create: bool = False) -> Iterator[str]:
    """The configured external URL, or the embedded server's (started for the command if needed).

    Only `create` (``nexus migrate``) may make a new embedded database: any
    other command on a data directory that does not exist would work on an
    empty database that no server uses.
    """
    if not config.embedded:
        yield config.database_url
        return
    if not create and not config.data_dir.is_dir():
        raise ClientError(f"no data directory {config.data_dir}: set --data-dir / NEXUS_DATA_DIR to the server's")
    pg = embedded.EmbeddedPostgres.start(config.data_dir)
    try:
        yield pg.url
    finally:
        pg.stop()


@contextlib.asynccontextmanager
async def database_connection(config: Config, *, create: bool = False) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the configured database (see `database_url`)."""
    with database_url(config, create=create) as url:
        try:
            conn = await database.connect(url)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ClientError(f"cannot connect to the database: {exc}") from None
        try:
            yield conn
        finally:
            await conn.close()
