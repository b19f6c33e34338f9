"""The near cache across real server processes: two `python -m server` processes share a
private redis-server; each keeps hot reads in its own memory, and a write through one
invalidates the other's copy before the write's RPC answers, also while the listeners
reconnect after CLIENT KILL and across a restart of Redis.
"""

from __future__ import annotations

import asyncio
import subprocess

import redis
from google.protobuf import field_mask_pb2

from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import user_service_pb2 as upb
from tests.db.cache_fixtures import RedisProcess
from tests.server.conftest import ADMIN_TOKEN
from tests.server.process_helpers import free_port, server_env, start_server_process, wait_serving
from tests.server.test_scale_out import stop_tree

ROUNDS = 150


def client_for(target: str) -> AsyncFerruleClient:
    return AsyncFerruleClient(
        config=ClientConfig(target=target, token=ADMIN_TOKEN, default_timeout=20.0)
    )


def data_commands(port: int) -> int:
    """GETs and scripts Redis has served (INFO commandstats)."""
    with redis.Redis(port=port) as admin:
        stats = admin.info("commandstats")
    return sum(
        int(entry["calls"])
        for name, entry in stats.items()
        if name in ("cmdstat_get", "cmdstat_evalsha", "cmdstat_eval")
    )


async def test_a_write_through_one_process_is_never_read_stale_through_another(
    pg_database_url: str, own_redis: RedisProcess, redis_namespace: str
) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        targets = []
        for _ in range(2):
            port = free_port()
            env = server_env(
                pg_database_url,
                port,
                REDIS_URL=own_redis.url,
                FERRULE_CACHE_PREFIX=redis_namespace,
                FERRULE_REQUEST_LOG="false",
            )
            processes.append(start_server_process(env))
            targets.append(f"127.0.0.1:{port}")
            wait_serving(targets[-1])  # one at a time: the first one migrates
        async with client_for(targets[0]) as reader, client_for(targets[1]) as writer:
            org = await writer.users.CreateOrganization(
                upb.CreateOrganizationRequest(organization=upb.Organization(display_name="near"))
            )
            user = await writer.users.CreateUser(
                upb.CreateUserRequest(
                    parent=org.name,
                    user=upb.User(
                        email="near@example.com",
                        username="near",
                        role=upb.USER_ROLE_MEMBER,
                        status=upb.USER_STATUS_ACTIVE,
                        auth_provider=upb.AUTH_PROVIDER_GOOGLE,
                    ),
                )
            )
            get = upb.GetUserRequest(name=user.name)
            # Warm the reader until its near cache serves the user with no Redis call.
            for _ in range(200):
                await reader.users.GetUser(get)
                before = data_commands(own_redis.port)
                for _ in range(20):
                    assert await reader.users.GetUser(get) == user
                if data_commands(own_redis.port) == before:
                    break
            else:
                raise AssertionError("the reader never served the user from memory")

            async def rounds(count: int, label: str, *, redis_up: bool = True) -> int:
                """Write through one process, read through the other at once: never
                stale. Returns how many follow-up reads were served from memory."""
                from_memory = 0
                for round_ in range(count):
                    updated = await writer.users.UpdateUser(
                        upb.UpdateUserRequest(
                            user=upb.User(name=user.name, full_name=f"{label} {round_}"),
                            update_mask=field_mask_pb2.FieldMask(paths=["full_name"]),
                        )
                    )
                    got = await reader.users.GetUser(get)  # right after the write answered
                    assert got == updated, f"{label} round {round_}: stale read"
                    if redis_up:
                        before = data_commands(own_redis.port)
                        assert await reader.users.GetUser(get) == updated
                        from_memory += data_commands(own_redis.port) == before
                return from_memory

            # The reader reloads after each write, then serves from memory again.
            assert await rounds(ROUNDS, "steady") >= ROUNDS // 2

            async def until_served_from_memory(label: str) -> None:
                for attempt in range(100):
                    if await rounds(1, f"{label} {attempt}"):
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError(f"{label}: the near cache never came back")

            # Both processes' listeners killed: no stale read while they reconnect.
            with redis.Redis(port=own_redis.port) as admin:
                killed = admin.client_kill_filter(_type="pubsub")
            assert killed == 2
            await rounds(20, "listeners killed")
            await until_served_from_memory("after the listeners came back")

            # Redis restarted (empty): reads stay right, then hits from memory resume.
            own_redis.kill()
            await rounds(5, "redis down", redis_up=False)
            own_redis.start()
            await rounds(5, "redis back")
            await until_served_from_memory("after the restart")
    finally:
        for process in processes:
            stop_tree(process, [])
