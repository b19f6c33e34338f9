"""TLS and mutual TLS on the real server (FERRULE_TLS_* settings), certificates made here.

With TLS on, a plaintext client never gets an answer (UNAVAILABLE: the handshake fails)
while a client trusting the configured CA works, with the bearer token as call
credentials. With mutual TLS on, the server also demands a client certificate signed
by FERRULE_TLS_CLIENT_CA_FILE: none, or one from another CA, is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferrule.client import AsyncFerruleClient, Unavailable
from ferrule.v1 import user_service_pb2 as pb
from tests.client.certs import CertificateAuthority, KeyPair
from tests.server.conftest import RunningServer, StartServer

SERVER_NAME = "ferrule.test"  # the certificate's only name; the target is 127.0.0.1


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def other_authority() -> CertificateAuthority:
    return CertificateAuthority()


def write_server_files(
    tmp_path: Path, authority: CertificateAuthority, *, client_ca: bytes | None
) -> dict[str, Path]:
    pair = authority.issue(SERVER_NAME, dns_name=SERVER_NAME, client=False)
    files = {
        "ferrule_tls_cert_file": tmp_path / "server.crt",
        "ferrule_tls_key_file": tmp_path / "server.key",
    }
    files["ferrule_tls_cert_file"].write_bytes(pair.certificate)
    files["ferrule_tls_key_file"].write_bytes(pair.private_key)
    if client_ca is not None:
        files["ferrule_tls_client_ca_file"] = tmp_path / "client-ca.crt"
        files["ferrule_tls_client_ca_file"].write_bytes(client_ca)
    return files


def tls_client(
    server: RunningServer,
    authority: CertificateAuthority,
    pair: KeyPair | None = None,
    **config: Any,
) -> AsyncFerruleClient:
    """An admin client over TLS; one attempt, so refusals surface at once."""
    return server.client(
        tls=True,
        root_certificates=authority.certificate,
        server_name_override=SERVER_NAME,
        certificate_chain=pair.certificate if pair else None,
        private_key=pair.private_key if pair else None,
        max_attempts=1,
        default_timeout=10.0,
        **config,
    )


async def list_organizations(client: AsyncFerruleClient) -> pb.ListOrganizationsResponse:
    return await client.users.ListOrganizations(pb.ListOrganizationsRequest())


async def create_then_get(client: AsyncFerruleClient) -> None:
    """A write then a read through the same (secure) channel."""
    org = await client.users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name="TLS Co"))
    )
    got = await client.users.GetOrganization(pb.GetOrganizationRequest(name=org.name))
    assert got.display_name == "TLS Co"


@pytest.fixture
async def tls_server(
    start_server: StartServer,
    pg_database_url: str,
    tmp_path: Path,
    authority: CertificateAuthority,
) -> RunningServer:
    files = write_server_files(tmp_path, authority, client_ca=None)
    return await start_server(pg_database_url, **files)


@pytest.fixture
async def mtls_server(
    start_server: StartServer,
    pg_database_url: str,
    tmp_path: Path,
    authority: CertificateAuthority,
) -> RunningServer:
    files = write_server_files(tmp_path, authority, client_ca=authority.certificate)
    return await start_server(pg_database_url, **files)


async def test_tls_client_works(tls_server: RunningServer, authority: CertificateAuthority) -> None:
    await create_then_get(tls_client(tls_server, authority))


async def test_plaintext_client_is_refused_when_tls_is_on(
    tls_server: RunningServer, authority: CertificateAuthority
) -> None:
    plaintext = tls_server.client(max_attempts=1, default_timeout=5.0)
    with pytest.raises(Unavailable):
        await list_organizations(plaintext)
    # The refusal is the transport's, not the server's: TLS still works right after.
    await list_organizations(tls_client(tls_server, authority))


async def test_client_refuses_a_server_from_an_unknown_ca(
    tls_server: RunningServer, other_authority: CertificateAuthority
) -> None:
    with pytest.raises(Unavailable):
        await list_organizations(tls_client(tls_server, other_authority))


async def test_mtls_accepts_a_client_certificate_from_the_configured_ca(
    mtls_server: RunningServer, authority: CertificateAuthority
) -> None:
    pair = authority.issue("svc-reporting", dns_name=None, client=True)
    await create_then_get(tls_client(mtls_server, authority, pair))


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: RunningServer, authority: CertificateAuthority
) -> None:
    with pytest.raises(Unavailable):
        await list_organizations(tls_client(mtls_server, authority))


async def test_mtls_refuses_a_client_certificate_from_another_ca(
    mtls_server: RunningServer,
    authority: CertificateAuthority,
    other_authority: CertificateAuthority,
) -> None:
    stranger = other_authority.issue("svc-stranger", dns_name=None, client=True)
    with pytest.raises(Unavailable):
        await list_organizations(tls_client(mtls_server, authority, stranger))
    # The same server still serves a properly certified client.
    pair = authority.issue("svc-reporting", dns_name=None, client=True)
    await list_organizations(tls_client(mtls_server, authority, pair))


async def test_mtls_refuses_plaintext(mtls_server: RunningServer) -> None:
    plaintext = mtls_server.client(max_attempts=1, default_timeout=5.0)
    with pytest.raises(Unavailable):
        await list_organizations(plaintext)


async def test_health_listener_answers_probes_in_plaintext_and_serves_nothing_else(
    start_server: StartServer,
    pg_database_url: str,
    authority: CertificateAuthority,
    tmp_path: Path,
) -> None:
    """Kubernetes' gRPC probes cannot speak TLS: FERRULE_HEALTH_LISTEN gives them a
    plaintext port with grpc.health.v1 alone, while the API stays TLS-only."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.server.process_helpers import free_port

    health_listen = f"127.0.0.1:{free_port()}"
    files = write_server_files(tmp_path, authority, client_ca=None)
    server = await start_server(pg_database_url, ferrule_health_listen=health_listen, **files)
    async with grpc.aio.insecure_channel(health_listen) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ferrule.v1.UserService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        list_orgs = channel.unary_unary(
            "/ferrule.v1.UserService/ListOrganizations",
            request_serializer=pb.ListOrganizationsRequest.SerializeToString,
            response_deserializer=pb.ListOrganizationsResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_orgs(pb.ListOrganizationsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The API port itself still refuses plaintext.
    with pytest.raises(Unavailable):
        await server.client(max_attempts=1).users.ListOrganizations(pb.ListOrganizationsRequest())
    listed = await tls_client(server, authority).users.ListOrganizations(
        pb.ListOrganizationsRequest()
    )
    assert list(listed.organizations) == []
