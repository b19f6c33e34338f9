"""`ferrule-server migrate`, `ferrule-server token` and development mode, as a user runs them."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, get_origin

import jwt
import pydantic
import pytest

import server.__main__ as entry
from db.migrate import current_revision, head_revision
from ferrule.client import Unauthenticated
from ferrule.v1 import user_service_pb2 as upb
from server import dev_mode
from server.settings import Settings, listener_settings, upstream_settings
from server.tokens import TokenError, parse_ttl
from tests.server.conftest import JWT_SECRET, RunningServer
from tests.server.process_helpers import REPO, server_env

ORG = "3f1c5d2e-0000-4000-8000-000000000001"


def ferrule_server(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_migrate_brings_the_schema_to_head_and_is_idempotent(pg_database_url: str) -> None:
    env = server_env(pg_database_url, 0, FERRULE_MIGRATE_ON_START="0")
    for _ in range(2):
        result = await asyncio.to_thread(ferrule_server, "migrate", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"ferrule: schema at {head_revision()}"
    assert await current_revision(pg_database_url) == head_revision()


async def test_a_minted_token_is_accepted_for_its_organization_and_scopes(
    pg_server: RunningServer,
) -> None:
    admin = pg_server.admin()
    org = await admin.users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="Minted"))
    )
    org_id = org.name.removeprefix("organizations/")
    env = server_env(pg_server.database_url, 0)
    args = ("token", "--org", org_id, "--scope", "read write", "--ttl", "1h")
    result = await asyncio.to_thread(ferrule_server, *args, env=env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()

    client = pg_server.client(token)
    created = await client.users.CreateUser(
        upb.CreateUserRequest(
            parent=org.name,
            user=upb.User(
                email="minted@example.com",
                role=upb.USER_ROLE_MEMBER,
                status=upb.USER_STATUS_ACTIVE,
                auth_provider=upb.AUTH_PROVIDER_GOOGLE,
            ),
        )
    )
    listed = await client.users.ListUsers(upb.ListUsersRequest(parent=org.name))
    assert [user.name for user in listed.users] == [created.name]

    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["org"] == org_id
    assert claims["scope"] == "read write"
    assert 3590 <= claims["exp"] - claims["iat"] <= 3600


async def test_a_token_signed_with_another_secret_is_refused(pg_server: RunningServer) -> None:
    env = server_env(pg_server.database_url, 0, FERRULE_JWT_SECRET="another-secret-" + "z" * 32)
    result = await asyncio.to_thread(ferrule_server, "token", "--org", ORG, env=env)
    assert result.returncode == 0, result.stderr
    with pytest.raises(Unauthenticated):
        await pg_server.client(result.stdout.strip()).users.ListUsers(
            upb.ListUsersRequest(parent=f"organizations/{ORG}")
        )


def refused_in_process(
    args: tuple[str, ...],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int | str | None, str, str]:
    """`ferrule-server token ...` through the same `main` in this process, for the
    refusals (the two tests above run the real command): exit code, stdout, stderr."""
    for name in list(os.environ):
        if name.startswith(("FERRULE_", "DATABASE_", "REDIS_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        entry.main(["token", *args])
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--org", ORG, "--scope", "read sudo"), "--scope"),
        (("--org", ORG, "--ttl", "1 week"), "--ttl"),
        (("--org", ORG, "--ttl", "0s"), "--ttl"),
        (("--org", ""), "--org"),
    ],
)
def test_token_refuses_what_the_server_would_refuse(
    args: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = server_env("sqlite+aiosqlite:///x.db", 0)
    code, out, err = refused_in_process(args, env, monkeypatch, capsys)
    assert code == 2
    assert message in err
    assert out == ""


def test_token_without_a_jwt_secret_says_which_variable_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = server_env("sqlite+aiosqlite:///x.db", 0)
    del env["FERRULE_JWT_SECRET"]
    code, _, err = refused_in_process(("--org", ORG), env, monkeypatch, capsys)
    assert code == 2
    assert "FERRULE_JWT_SECRET is not set" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_ttl_accepts_seconds_minutes_hours_and_days(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "1.5h", "1w", "0"])
def test_ttl_refuses_anything_else(text: str) -> None:
    with pytest.raises(TokenError):
        parse_ttl(text)


def embedded(**values: Any) -> Settings:
    return Settings(**{"database_url": "sqlite+aiosqlite:///./ferrule.db", **values})


def test_development_mode_applies_only_to_the_embedded_default_on_loopback() -> None:
    for listen in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1"):
        assert dev_mode.blockers(embedded(ferrule_listen=listen)) == []


@pytest.mark.parametrize(
    ("values", "blocker"),
    [
        ({"redis_url": "redis://127.0.0.1:6379/0"}, "REDIS_URL"),
        (
            {"ferrule_redis_sentinels": "127.0.0.1:26379", "ferrule_redis_sentinel_service": "m"},
            "FERRULE_REDIS_SENTINELS",
        ),
        ({"database_url": "postgresql+asyncpg://u:p@127.0.0.1/db"}, "DATABASE_URL"),
        ({"ferrule_listen": "0.0.0.0:50051"}, "FERRULE_LISTEN"),
        ({"ferrule_listen": "[::]:50051"}, "FERRULE_LISTEN"),
        ({"ferrule_listen": "ferrule.internal:50051"}, "FERRULE_LISTEN"),
    ],
)
def test_development_mode_is_off_once_anything_is_configured(
    values: dict[str, Any], blocker: str, tmp_path: Path
) -> None:
    settings = embedded(**values)
    assert blocker in dev_mode.blockers(settings)
    unchanged, banner = dev_mode.apply(settings, tmp_path / "token")
    assert banner is None
    assert unchanged is settings
    assert not (tmp_path / "token").exists()


#: Credentials, found by type: secrets, and files (keys and certificates).
CREDENTIAL_SETTINGS = sorted(
    name
    for name, field in Settings.model_fields.items()
    if "Secret" in str(field.annotation) or "Path" in str(field.annotation)
)
#: Addresses this server binds, found by name: ``*_listen`` is host:port, ``*_host`` a host.
ADDRESS_SETTINGS = sorted(
    name for name in Settings.model_fields if name.endswith(("_listen", "_host"))
)
#: Where other services are, found by name; a URL may carry a password.
URL_SETTINGS = sorted(name for name in Settings.model_fields if name.endswith(("_url", "_urls")))
#: What a setting is valid only together with (none of them is needed to end the mode).
COMPANIONS: dict[str, dict[str, str]] = {
    "ferrule_tls_cert_file": {"ferrule_tls_key_file": "/etc/ferrule/tls.key"},
    "ferrule_tls_key_file": {"ferrule_tls_cert_file": "/etc/ferrule/tls.crt"},
    "ferrule_tls_client_ca_file": {
        "ferrule_tls_cert_file": "/etc/ferrule/tls.crt",
        "ferrule_tls_key_file": "/etc/ferrule/tls.key",
    },
}


def configured(name: str, text: str) -> Settings:
    """The embedded default with `name` set to `text` (a list setting: to one item)."""
    value: object = [text] if get_origin(Settings.model_fields[name].annotation) is list else text
    return embedded(**{**COMPANIONS.get(name, {}), name: value})


def assert_development_mode_off(settings: Settings, name: str, tmp_path: Path) -> None:
    assert name.upper() in dev_mode.blockers(settings)
    unchanged, banner = dev_mode.apply(settings, tmp_path / "token")
    assert banner is None
    assert unchanged is settings
    assert not (tmp_path / "token").exists()
    named = re.findall(r"[A-Z][A-Z0-9_]+", dev_mode.SWITCHES_OFF)
    assert name.upper() in named, "the banner names every setting that ends development mode"


def test_the_model_has_settings_of_every_kind_development_mode_looks_for() -> None:
    assert "ferrule_jwt_secret" in CREDENTIAL_SETTINGS
    assert "ferrule_tls_key_file" in CREDENTIAL_SETTINGS
    assert "ferrule_listen" in ADDRESS_SETTINGS
    assert "database_url" in URL_SETTINGS
    # The tests below find addresses and URLs by name, server/dev_mode.py by the model's
    # markers: a setting on one side only would escape either them or development mode.
    assert set(listener_settings()) == set(ADDRESS_SETTINGS)
    assert set(upstream_settings()) >= set(URL_SETTINGS)


@pytest.mark.parametrize("name", CREDENTIAL_SETTINGS)
def test_any_credential_ends_development_mode(name: str, tmp_path: Path) -> None:
    text = "s" * 32 if "Secret" in str(Settings.model_fields[name].annotation) else "/etc/f/k"
    assert_development_mode_off(configured(name, text), name, tmp_path)


@pytest.mark.parametrize("name", ADDRESS_SETTINGS)
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "ferrule.internal"])
def test_any_non_loopback_address_ends_development_mode(
    name: str, host: str, tmp_path: Path
) -> None:
    text = f"[{host}]:50052" if ":" in host else f"{host}:50052"
    settings = configured(name, text if name.endswith("_listen") else host)
    assert_development_mode_off(settings, name, tmp_path)


@pytest.mark.parametrize("name", ADDRESS_SETTINGS)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_addresses_keep_development_mode(name: str, host: str) -> None:
    text = f"[{host}]:50052" if ":" in host else f"{host}:50052"
    settings = configured(name, text if name.endswith("_listen") else host)
    assert dev_mode.blockers(settings) == []


@pytest.mark.parametrize("name", URL_SETTINGS)
def test_any_service_url_other_than_sqlite_ends_development_mode(name: str, tmp_path: Path) -> None:
    url = "postgresql+asyncpg://ferrule:password@db.internal/ferrule"
    if name.startswith("redis"):
        url = "redis://:password@cache.internal:6379/0"
    if name == "database_replica_urls":
        # Replicas exist only beside a server database, which ends the mode by itself; on
        # the embedded default they are refused before development mode is considered.
        with pytest.raises(pydantic.ValidationError, match="the embedded SQLite has no replicas"):
            configured(name, url)
        return
    assert_development_mode_off(configured(name, url), name, tmp_path)


def test_development_token_is_kept_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / ".ferrule-dev-token"
    first, banner = dev_mode.apply(embedded(), path)
    assert banner is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, _ = dev_mode.apply(embedded(), path)
    assert first.ferrule_admin_token is not None
    assert again.ferrule_admin_token is not None
    token = first.ferrule_admin_token.get_secret_value()
    assert token == again.ferrule_admin_token.get_secret_value() == path.read_text().strip()
    text = banner.text(50051)
    assert token in text
    assert dev_mode.SWITCHES_OFF in text
    assert "127.0.0.1:50051 ferrule.v1.UserService/CreateOrganization" in text
