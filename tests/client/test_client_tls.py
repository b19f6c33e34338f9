"""TLS, mutual TLS, server-name override and the bearer token as call credentials."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferrule.client import errors
from ferrule.client.channel import create_aio_channel, create_channel
from ferrule.client.config import ClientConfig
from tests.client.certs import CertificateAuthority, KeyPair
from tests.client.fakes import SERVING, FakeOperations, Recorder, register_fakes
from tests.client.servers import ServerThread

SERVER_NAME = "ferrule.test"  # the only name in the server certificate, never the target


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def client_pair(authority: CertificateAuthority) -> KeyPair:
    return authority.issue("svc-reporting", dns_name=None, client=True)


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def mtls_server(authority: CertificateAuthority, recorder: Recorder) -> Iterator[ServerThread]:
    pair = authority.issue(SERVER_NAME, dns_name=SERVER_NAME, client=False)
    credentials = grpc.ssl_server_credentials(
        [(pair.private_key, pair.certificate)],
        root_certificates=authority.certificate,
        require_client_auth=True,
    )

    def register(server: grpc.aio.Server) -> None:
        register_fakes(server, recorder, FakeOperations(count=0))

    with ServerThread(register, credentials) as running:
        yield running


def tls_config(
    server: ServerThread, authority: CertificateAuthority, client: KeyPair | None
) -> ClientConfig:
    return ClientConfig(
        target=server.target,
        token="tls-token",
        tls=True,
        root_certificates=authority.certificate,
        certificate_chain=client.certificate if client else None,
        private_key=client.private_key if client else None,
        server_name_override=SERVER_NAME,
        max_attempts=1,
        default_timeout=10,
    )


async def check(mode: str, config: ClientConfig, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    if mode == "sync":

        def call() -> int:
            with create_channel(config) as channel:
                status: int = health_pb2_grpc.HealthStub(channel).Check(request).status
                return status

        return await asyncio.to_thread(call)
    async with create_aio_channel(config) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(request)
        status = response.status
        return int(status)


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_mutual_tls_with_token_as_call_credentials(
    mode, mtls_server, authority, client_pair, recorder
):
    key = uuid.uuid4().hex
    config = tls_config(mtls_server, authority, client_pair)
    assert await check(mode, config, f"ok:{key}") == SERVING
    assert recorder.metadata[key]["authorization"] == "Bearer tls-token"
    assert recorder.client_common_names[key] == [b"svc-reporting"]


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_server_refuses_a_client_without_its_certificate(mode, mtls_server, authority):
    config = tls_config(mtls_server, authority, client=None)
    with pytest.raises(errors.Unavailable):
        await check(mode, config, f"ok:{uuid.uuid4().hex}")


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_client_refuses_a_server_it_cannot_verify(mode, mtls_server, client_pair):
    other_authority = CertificateAuthority()
    config = tls_config(mtls_server, other_authority, client_pair)
    with pytest.raises(errors.Unavailable):
        await check(mode, config, f"ok:{uuid.uuid4().hex}")
