"""docs/deploy.md's PostgreSQL step, followed on a fresh cluster as an operator would.

A managed PostgreSQL gives the operator an administrator, never a superuser login for the
service: the guide's SQL runs as the administrator, then the migration runs as the login
role it creates (what the migration Job does with the Secret's DATABASE_URL), and the
server serves with the production overlay's row-level security role. A fresh cluster,
because the suite's own already holds the roles the migrations create, which would hide
a step the guide leaves out.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import asyncpg

from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import user_service_pb2 as upb
from server.app import FerruleApp
from server.telemetry import setup_telemetry
from tests.deploy.test_manifests import config as rendered_config
from tests.deploy.test_manifests import render
from tests.server.conftest import ADMIN_TOKEN, make_token, server_settings
from tests.server.pg_cluster import Cluster, standalone_cluster

REPO = Path(__file__).resolve().parents[2]
#: The login role and database the guide creates.
LOGIN_ROLE = "ferrule"
DATABASE = "ferrule"


def guide_sql(section: str) -> list[str]:
    """The statements of the ```sql blocks of one "###" section of docs/deploy.md."""
    text = (REPO / "docs" / "deploy.md").read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", body, re.DOTALL)
    lines = [line.split("--", 1)[0] for block in blocks for line in block.splitlines()]
    return [s.strip() for s in " ".join(lines).split(";") if s.strip()]


async def run_as_administrator(cluster: Cluster, statements: list[str]) -> None:
    connection = await asyncpg.connect(cluster.dsn(), timeout=30)
    try:
        for statement in statements:  # one by one: CREATE DATABASE refuses a transaction
            await connection.execute(statement)
    finally:
        await connection.close()


async def test_the_guides_postgresql_step_lets_the_login_role_migrate_and_serve_under_rls() -> None:
    statements = guide_sql("2. Prepare PostgreSQL")
    assert any(s.startswith(f"CREATE DATABASE {DATABASE}") for s in statements), statements
    app_role = rendered_config(render("production"))["DATABASE_APP_ROLE"]

    with standalone_cluster() as cluster:
        await run_as_administrator(cluster, statements)
        # The guide's password is a placeholder; the throwaway cluster trusts 127.0.0.1.
        url = f"postgresql+asyncpg://{LOGIN_ROLE}@127.0.0.1:{cluster.port}/{DATABASE}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRULE_", "DATABASE_"))}
        migrated = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "server", "migrate"],
            env={**env, "DATABASE_URL": url},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr[-3000:]

        telemetry = setup_telemetry(environ={}, set_global=False)
        app = FerruleApp(server_settings(url, database_app_role=app_role), telemetry=telemetry)
        try:
            port = await app.start()
            config = ClientConfig(target=f"127.0.0.1:{port}", token=ADMIN_TOKEN, max_attempts=1)
            async with AsyncFerruleClient(config=config) as admin:
                created = await admin.users.CreateOrganization(
                    upb.CreateOrganizationRequest(
                        organization=upb.Organization(display_name="Guide")
                    )
                )
            org_id = created.name.removeprefix("organizations/")
            tenant_config = replace(config, token=make_token(org_id))
            async with AsyncFerruleClient(config=tenant_config) as tenant:
                user = await tenant.users.CreateUser(
                    upb.CreateUserRequest(
                        parent=created.name,
                        user=upb.User(
                            email="ops@example.com",
                            role=upb.USER_ROLE_MEMBER,
                            status=upb.USER_STATUS_ACTIVE,
                            auth_provider=upb.AUTH_PROVIDER_GOOGLE,
                        ),
                    )
                )
                listed = await tenant.users.ListUsers(upb.ListUsersRequest(parent=created.name))
            assert [u.name for u in listed.users] == [user.name]
        finally:
            await app.stop(grace=0.5)
