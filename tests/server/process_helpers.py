"""Running `python -m server` as a real subprocess, for tests of the process itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.conftest import ADMIN_TOKEN, JWT_SECRET

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(database_url: str, port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FERRULE_", "DATABASE_", "REDIS_"))
    }
    env.update(
        FERRULE_LISTEN=f"127.0.0.1:{port}",
        DATABASE_URL=database_url,
        FERRULE_JWT_SECRET=JWT_SECRET,
        FERRULE_ADMIN_TOKEN=ADMIN_TOKEN,
        FERRULE_MIGRATE_ON_START="1",
        FERRULE_GRACE_SECONDS="5",
        FERRULE_HEALTH_PROBE_SECONDS="0.5",
    )
    env.update(extra)
    return env


def start_server_process(env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_serving(target: str, timeout: float = 60.0) -> None:
    """Poll grpc.health.v1 Check until SERVING (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING within {timeout}s: {last!r}")
