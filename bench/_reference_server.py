"""The read bench's two yardsticks beside Ferrule, each one process on uvloop like Ferrule:

* ``BENCH_REFERENCE=bare``: a grpc.aio server whose GetUser answers one prebuilt User
  (built at start from the row named by ``BENCH_USER_NAME``, so its reply has the same
  size as Ferrule's): what gRPC in Python allows at all, the framework ceiling;
* ``BENCH_REFERENCE=asyncpg``: the hand-written service one would write without Ferrule:
  grpc.aio and an asyncpg pool, parse the name, one SELECT of the same row (user and
  profile), build the User. No authentication, tenancy, deadlines, request log, tracing,
  error details or capacity limits: the cost of exactly the work, nothing else.

Both listen on ``FERRULE_LISTEN``, read ``DATABASE_URL`` and print ``serving on`` when
ready, as ``python -m server`` does, so bench.harness starts and stops them alike.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import uvloop

from ferrule.v1 import user_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

SELECT_USER = """
SELECT u.organization_id, u.id, u.email, u.username, u.full_name, u.role, u.status,
       u.auth_provider, u.password_hash IS NOT NULL, u.last_login_time, u.version,
       u.create_time, u.update_time, u.delete_time, u.create_by, u.update_by, u.delete_by,
       p.bio, p.avatar_uri, p.locale, p.time_zone
FROM users u LEFT JOIN user_profiles p ON p.user_id = u.id
WHERE u.id = $1 AND u.organization_id = $2
"""


def _timestamp(message: Any, value: datetime | None) -> None:
    if value is not None:
        message.FromDatetime(value)


def user_from_row(row: asyncpg.Record) -> pb.User:
    user = pb.User(
        name=f"organizations/{row[0]}/users/{row[1]}",
        email=row[2],
        username=row[3],
        full_name=row[4] or "",
        role=pb.UserRole.Value("USER_ROLE_" + row[5]),
        status=pb.UserStatus.Value("USER_STATUS_" + row[6]),
        auth_provider=pb.AuthProvider.Value("AUTH_PROVIDER_" + row[7]),
        has_password=row[8],
        etag=f'W/"{row[10]}"',
        create_by=row[14] or "",
        update_by=row[15] or "",
        delete_by=row[16] or "",
        profile=pb.UserProfile(
            bio=row[17] or "", avatar_uri=row[18] or "", locale=row[19] or "",
            time_zone=row[20] or "",
        ),
    )  # fmt: skip
    _timestamp(user.last_login_time, row[9])
    _timestamp(user.create_time, row[11])
    _timestamp(user.update_time, row[12])
    _timestamp(user.delete_time, row[13])
    return user


def parse_name(name: str) -> tuple[uuid.UUID, uuid.UUID]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "organizations" or parts[2] != "users":
        raise ValueError(name)
    return uuid.UUID(parts[1]), uuid.UUID(parts[3])


async def serve() -> None:
    listen = os.environ["FERRULE_LISTEN"]
    dsn = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://", 1)
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=10)

    async def read(name: str) -> pb.User | None:
        organization_id, user_id = parse_name(name)
        row = await pool.fetchrow(SELECT_USER, user_id, organization_id)
        return None if row is None else user_from_row(row)

    if os.environ["BENCH_REFERENCE"] == "bare":
        prebuilt = await read(os.environ["BENCH_USER_NAME"])
        await pool.close()
        assert prebuilt is not None

        async def get_user(request: pb.GetUserRequest, context: Context) -> Any:
            return prebuilt
    else:

        async def get_user(request: pb.GetUserRequest, context: Context) -> Any:
            try:
                user = await read(request.name)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad name")
            if user is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
            return user

    handler = grpc.method_handlers_generic_handler(
        "ferrule.v1.UserService",
        {
            "GetUser": grpc.unary_unary_rpc_method_handler(
                get_user,
                request_deserializer=pb.GetUserRequest.FromString,
                response_serializer=pb.User.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"serving on {listen}\n")
    sys.stdout.flush()
    await stop.wait()
    await server.stop(1)
    await pool.close()


if __name__ == "__main__":
    uvloop.run(serve())
