"""TLS and mTLS: a real server on port 0 with certificates made in the test (trustme).

Under TLS a client trusting the server's CA is served and a plaintext client
or one trusting other CAs is not; under mTLS a client must also present a
certificate signed by the client CA. `nexus health` and `nexus seed` (the
container's HEALTHCHECK and a write path) speak TLS and mTLS with the client
settings and fail in one line without them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus.server import NexusServer
from nexus.v1 import interaction_pb2 as pb
from nexus.v1 import interaction_pb2_grpc

from support.processes import nexus_env, run_nexus
from support.rpc import JWT_SECRET, SERVICE
from support.servers import server_config

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    def credentials(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) as grpc.ssl_channel_credentials takes them."""
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    server_ca: Path
    server: KeyPair
    client_ca: Path
    client: KeyPair
    stranger: KeyPair  # a client certificate from a CA the server does not trust


def write_pair(cert: trustme.LeafCert, directory: Path, name: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    cert.cert_chain_pems[0].write_to_path(str(pair.cert))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(pair.cert), append=True)
    cert.private_key_pem.write_to_path(str(pair.key))
    return pair


def make_pki(directory: Path, server_names: tuple[str, ...]) -> Pki:
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(directory / "server-ca.crt"))
    client_ca.cert_pem.write_to_path(str(directory / "client-ca.crt"))
    return Pki(
        server_ca=directory / "server-ca.crt",
        server=write_pair(server_ca.issue_cert(*server_names), directory, "server"),
        client_ca=directory / "client-ca.crt",
        client=write_pair(client_ca.issue_cert("backend@nexus.test"), directory, "client"),
        stranger=write_pair(other_ca.issue_cert("stranger@nexus.test"), directory, "stranger"),
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, ("127.0.0.1", "localhost"))


@pytest.fixture
async def tls_server(db_url: str, pki: Pki) -> AsyncIterator[NexusServer]:
    server = NexusServer(server_config(db_url, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key)))
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def mtls_server(db_url: str, pki: Pki) -> AsyncIterator[NexusServer]:
    server = NexusServer(server_config(
        db_url, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.client_ca),
    ))
    await server.start()
    yield server
    await server.stop(grace=0)


def tls_channel(port: int, ca: Path | None, client: KeyPair | None = None) -> grpc.aio.Channel:
    key, chain = client.credentials() if client else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None, private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def check(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of a health Check that must fail on this channel."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(channel)
    return info.value.code()


async def create_entry(channel: grpc.aio.Channel) -> str:
    stub = interaction_pb2_grpc.InteractionServiceStub(channel)
    request = pb.CreateEntryRequest(author_id="alice", type="note", title="over TLS", content="c")
    return (await stub.CreateEntry(request, metadata=SERVICE, timeout=10)).entry.entry_id


# --- TLS ------------------------------------------------------------------------------


async def test_tls_client_trusting_the_server_ca_is_served(tls_server: NexusServer, pki: Pki,
                                                          db: asyncpg.Connection) -> None:
    async with tls_channel(tls_server.port, pki.server_ca) as channel:
        assert await check(channel) == SERVING
        entry_id = await create_entry(channel)
    assert await db.fetchval("SELECT title FROM entries WHERE entry_id = $1", entry_id) == "over TLS"


async def test_plaintext_client_is_refused_by_a_tls_server(tls_server: NexusServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_not_trusting_the_server_ca_is_refused(tls_server: NexusServer) -> None:
    async with tls_channel(tls_server.port, ca=None) as channel:  # the system's CAs only
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE


# --- mTLS -----------------------------------------------------------------------------


async def test_mtls_refuses_a_client_without_a_certificate(mtls_server: NexusServer, pki: Pki) -> None:
    async with tls_channel(mtls_server.port, pki.server_ca) as channel:
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: NexusServer, pki: Pki) -> None:
    async with tls_channel(mtls_server.port, pki.server_ca, pki.stranger) as channel:
        assert await refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_certificate_signed_by_the_client_ca(
    mtls_server: NexusServer, pki: Pki, db: asyncpg.Connection
) -> None:
    async with tls_channel(mtls_server.port, pki.server_ca, pki.client) as channel:
        assert await check(channel) == SERVING
        entry_id = await create_entry(channel)
    assert await db.fetchval("SELECT count(*) FROM entries WHERE entry_id = $1", entry_id) == 1


# --- the client commands --------------------------------------------------------------


def client_flags(pki: Pki, *, ca: bool = True, client_cert: KeyPair | None = None) -> list[str]:
    flags = ["--tls-ca-file", str(pki.server_ca)] if ca else []
    if client_cert:
        flags += ["--tls-client-cert-file", str(client_cert.cert), "--tls-client-key-file", str(client_cert.key)]
    return flags


async def test_nexus_health_over_tls_with_the_ca_and_not_without(tls_server: NexusServer, pki: Pki) -> None:
    port = str(tls_server.port)
    run = await run_nexus("health", "--port", port, *client_flags(pki), env=nexus_env())
    assert run.code == 0, run.output
    assert run.stdout.strip() == f"127.0.0.1:{port}: SERVING"

    plaintext = await run_nexus("health", "--port", port, env=nexus_env())
    assert plaintext.code == 1, plaintext.output
    assert plaintext.error_line.startswith(f"nexus: cannot reach 127.0.0.1:{port} (UNAVAILABLE"), plaintext.error_line


async def test_nexus_health_under_mtls_needs_the_client_certificate(mtls_server: NexusServer, pki: Pki) -> None:
    port = str(mtls_server.port)
    run = await run_nexus("health", "--port", port, *client_flags(pki, client_cert=pki.client), env=nexus_env())
    assert run.code == 0, run.output
    assert run.stdout.strip() == f"127.0.0.1:{port}: SERVING"

    for flags in (client_flags(pki), client_flags(pki, client_cert=pki.stranger), []):
        refused_run = await run_nexus("health", "--port", port, *flags, env=nexus_env())
        assert refused_run.code == 1, (flags, refused_run.output)
        assert refused_run.error_line.startswith(f"nexus: cannot reach 127.0.0.1:{port} (UNAVAILABLE"), flags


async def test_nexus_health_takes_the_settings_from_the_environment(mtls_server: NexusServer, pki: Pki) -> None:
    """The container's HEALTHCHECK runs `nexus health` with the server's environment plus the client settings."""
    env = nexus_env(
        NEXUS_PORT=mtls_server.port, NEXUS_TLS_CERT_FILE=pki.server.cert, NEXUS_TLS_KEY_FILE=pki.server.key,
        NEXUS_TLS_CLIENT_CA_FILE=pki.client_ca, NEXUS_TLS_CA_FILE=pki.server_ca,
        NEXUS_TLS_CLIENT_CERT_FILE=pki.client.cert, NEXUS_TLS_CLIENT_KEY_FILE=pki.client.key,
    )
    run = await run_nexus("health", env=env)
    assert run.code == 0, run.output
    assert run.stdout.strip() == f"127.0.0.1:{mtls_server.port}: SERVING"


async def test_nexus_seed_writes_through_mtls(mtls_server: NexusServer, pki: Pki, db: asyncpg.Connection) -> None:
    flags = client_flags(pki, client_cert=pki.client)
    run = await run_nexus("seed", "--port", str(mtls_server.port), *flags, env=nexus_env(NEXUS_JWT_SECRET=JWT_SECRET))
    assert run.code == 0, run.output
    assert await db.fetchval("SELECT count(*) FROM entries WHERE author_id = 'alice'") > 0


async def test_tls_server_name_checks_a_certificate_issued_for_another_name(db_url: str, tmp_path: Path) -> None:
    """A certificate for the service's DNS name, checked by `nexus health` connecting to 127.0.0.1."""
    pki = make_pki(tmp_path, ("nexus.test",))
    server = NexusServer(server_config(db_url, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key)))
    await server.start()
    try:
        port = str(server.port)
        named = await run_nexus("health", "--port", port, *client_flags(pki), "--tls-server-name", "nexus.test",
                                env=nexus_env())
        assert named.code == 0, named.output
        assert named.stdout.strip() == f"127.0.0.1:{port}: SERVING"

        unnamed = await run_nexus("health", "--port", port, *client_flags(pki), env=nexus_env())
        assert unnamed.code == 1, unnamed.output
        assert unnamed.error_line.startswith(f"nexus: cannot reach 127.0.0.1:{port}"), unnamed.error_line
    finally:
        await server.stop(grace=0)


async def test_client_tls_files_that_cannot_be_read_are_one_line_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.crt"
    run = await run_nexus("health", "--tls-ca-file", str(missing), env=nexus_env())
    assert run.code == 1
    assert run.error_line == f"nexus: cannot read tls_ca_file {missing}: No such file or directory"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-client-cert-file", "client.crt"], "tls_client_cert_file and tls_client_key_file must be set together"),
        (["--tls-server-name", "nexus.test"], "tls_server_name needs TLS: set tls_ca_file"),
    ],
)
async def test_incomplete_client_tls_settings_are_configuration_errors(flags: list[str], message: str) -> None:
    run = await run_nexus("health", *flags, env=nexus_env())
    assert run.code == 2
    assert run.error_line == f"nexus: configuration error: {message}"
