"""Bearer tokens: JWT (HS256, RS256, ES256) and the static admin token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.auth import ADMIN_PRINCIPAL, AuthenticationError, Authenticator
from server.authorization import (
    Access,
    PermissionDeniedError,
    access_of,
    check_organization,
    check_scope,
)
from tests.polling import eventually_sync

SECRET = "s" * 32


def claims(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": "svc-a",
        "org": "11111111-1111-1111-1111-111111111111",
        "scope": "read write",
        "exp": int(time.time()) + 60,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs_auth() -> Authenticator:
    return Authenticator(
        jwt_secret=SECRET, jwt_public_key=None, algorithms=["HS256"], admin_token="root-token"
    )


def test_hs256_token_yields_principal() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    principal = hs_auth().authenticate(f"Bearer {token}")
    assert principal.subject == "svc-a"
    assert principal.scopes == {"read", "write"}
    assert not principal.all_organizations


def test_admin_token() -> None:
    assert hs_auth().authenticate("Bearer root-token") == ADMIN_PRINCIPAL


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic abc", "Bearer not-a-jwt", "Bearer a.b.c"],
)
def test_malformed_credentials_are_refused(header: str | None) -> None:
    with pytest.raises(AuthenticationError):
        hs_auth().authenticate(header)


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": int(time.time()) - 10},
        {"sub": None},
        {"org": None},
        {"scope": None},
        {"scope": "read superuser"},
    ],
)
def test_bad_claims_are_refused(bad: dict[str, object]) -> None:
    token = jwt.encode(claims(**bad), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError):
        hs_auth().authenticate(f"Bearer {token}")


def test_wrong_secret_is_refused() -> None:
    token = jwt.encode(claims(), "x" * 32, algorithm="HS256")
    with pytest.raises(AuthenticationError):
        hs_auth().authenticate(f"Bearer {token}")


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_tokens(algorithm: str) -> None:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    auth = Authenticator(
        jwt_secret=None,
        jwt_public_key=public_pem.decode(),
        algorithms=["RS256", "ES256"],
        admin_token=None,
    )
    token = jwt.encode(claims(), key, algorithm=algorithm)
    assert auth.authenticate(f"Bearer {token}").subject == "svc-a"
    # Algorithm confusion: an HS256 token signed with the public key must not pass.
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    payload = b64url(b'{"sub":"x","org":"*","scope":"admin","exp":9999999999}')
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{b64url(signature)}"
    with pytest.raises(AuthenticationError):
        auth.authenticate(f"Bearer {forged}")


def test_scopes_per_rpc() -> None:
    assert access_of("/ferrule.v1.UserService/GetUser") is Access.READ
    assert access_of("/ferrule.v1.UserService/CreateUser") is Access.WRITE
    assert access_of("/ferrule.v1.PredictionService/PurgePredictions") is Access.ADMIN
    assert access_of("/grpc.health.v1.Health/Watch") is Access.ANONYMOUS
    with pytest.raises(PermissionDeniedError) as unknown:
        access_of("/ferrule.v1.UserService/DropEverything")
    assert unknown.value.reason == "RPC_NOT_AUTHORIZED"
    reader = hs_auth().authenticate(
        "Bearer " + jwt.encode(claims(scope="read"), SECRET, algorithm="HS256")
    )
    check_scope(reader, Access.READ, "/ferrule.v1.UserService/ListUsers")
    with pytest.raises(PermissionDeniedError):
        check_scope(reader, Access.WRITE, "/ferrule.v1.UserService/CreateUser")
    with pytest.raises(PermissionDeniedError):
        check_organization(reader, "22222222-2222-2222-2222-222222222222")
    check_organization(reader, "11111111-1111-1111-1111-111111111111")


def test_a_verified_token_is_refused_once_it_expires() -> None:
    auth = hs_auth()
    # Far enough ahead that both calls below come first even on a busy machine.
    token = jwt.encode(claims(exp=int(time.time()) + 3), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {token}").subject == "svc-a"
    assert auth.authenticate(f"Bearer {token}").subject == "svc-a"  # from the verified cache

    def refused() -> bool:
        try:
            auth.authenticate(f"Bearer {token}")
        except AuthenticationError:
            return True
        return False

    eventually_sync(refused, what="the expired token refused", interval=0.1)
