"""The in-process test server that client users run their own tests against."""

from __future__ import annotations

import pytest

from ferrule.client import InvalidArgument, NotFound, PermissionDenied
from ferrule.client.testing import FerruleTestServer
from ferrule.v1 import user_service_pb2 as pb


def test_sync_client_against_the_in_process_server() -> None:
    with FerruleTestServer() as server, server.client() as admin:
        org = admin.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name="acme"))
        )
        org_id = org.name.split("/")[1]
        with server.client(server.token_for(org_id)) as client:
            user = client.users.CreateUser(
                pb.CreateUserRequest(
                    parent=org.name,
                    user=pb.User(
                        email="Ada@Example.com",
                        username="ada",
                        auth_provider=pb.AUTH_PROVIDER_GOOGLE,
                        role=pb.USER_ROLE_MEMBER,
                    ),
                )
            )
            assert user.email == "ada@example.com"
            with pytest.raises(InvalidArgument) as info:
                client.users.CreateUser(
                    pb.CreateUserRequest(parent=org.name, user=pb.User(email="not an email"))
                )
            assert any(field.endswith("email") for field, _ in info.value.field_violations)
            with pytest.raises(NotFound):
                client.users.GetUser(pb.GetUserRequest(name=user.name[:-4] + "0000"))
        with (
            server.client(server.token_for(org_id, scope="read")) as reader,
            pytest.raises(PermissionDenied),
        ):
            reader.users.DeleteUser(pb.DeleteUserRequest(name=user.name))
    assert server.target  # stopped cleanly: nothing left to assert but the exit


async def test_async_client_against_the_in_process_server() -> None:
    server = FerruleTestServer().start()
    try:
        async with server.async_client() as admin:
            listed = await admin.users.ListOrganizations(pb.ListOrganizationsRequest())
            assert list(listed.organizations) == []
    finally:
        server.stop()
