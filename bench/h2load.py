"""Unary gRPC load from h2load (nghttp2's C load generator), and whose CPU it cost.

A Python client spends about a core of its own to keep a grpc.aio server busy, so on two
shared cores it measures itself as much as the server. h2load costs a fraction of that.
It speaks HTTP/2, not gRPC: the body is the gRPC frame (a 0x00 byte, the message length
as 4 bytes big-endian, the message) and it never reads ``grpc-status`` (a gRPC error is
an HTTP 200 too). So a run proves only that every request got a 2xx; the answers
themselves are checked by the caller (a real gRPC call before and after, and the
server's own error record).

Each run's CPU is read from ``/proc`` (psutil) around the whole h2load process, for the
server, for the PostgreSQL backends serving that server's connections (matched by client
port), and for Redis (its pid from ``INFO server``; Redis is shared with other users of
the machine, so its figure is an upper bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

from bench.loadgen import process_cpu_seconds

H2LOAD = "h2load"
PG_PORT = 5432


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@contextlib.contextmanager
def body_file(message: bytes) -> Iterator[Path]:
    with tempfile.NamedTemporaryFile(prefix="h2load-body-", suffix=".bin") as handle:
        handle.write(grpc_frame(message))
        handle.flush()
        yield Path(handle.name)


@dataclass(frozen=True)
class H2Result:
    requests: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    seconds: float
    #: CPU seconds used during the run: the server, its PostgreSQL backends, Redis.
    server_cpu_s: float
    postgres_cpu_s: float
    redis_cpu_s: float
    #: h2load's own report, for a run that was not clean.
    report: str

    @property
    def rps(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    def us_per_call(self, cpu_s: float) -> float:
        return cpu_s / self.succeeded * 1e6 if self.succeeded else 0.0

    @property
    def clean(self) -> bool:
        """Every request answered with HTTP 2xx (gRPC status is checked elsewhere)."""
        return (
            self.requests > 0
            and self.failed == 0
            and self.errored == 0
            and self.status_2xx == self.succeeded == self.requests
        )


def postgres_backends_of(server_pid: int) -> list[psutil.Process]:
    """The PostgreSQL backend processes serving ``server_pid``'s connections: the backend
    whose socket's remote end is one of the server's local ports to PostgreSQL."""
    ports: set[int] = set()
    server = psutil.Process(server_pid)
    for member in (server, *server.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            for conn in member.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == PG_PORT:
                    ports.add(conn.laddr.port)
    backends = []
    for system_conn in psutil.net_connections(kind="tcp"):
        ours = system_conn.laddr.port if system_conn.laddr else None
        theirs = system_conn.raddr.port if system_conn.raddr else None
        if ours == PG_PORT and theirs in ports and system_conn.pid is not None:
            with contextlib.suppress(psutil.Error):
                backends.append(psutil.Process(system_conn.pid))
    return backends


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


_NUMBERS = {
    "requests": re.compile(
        r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed,"
        r" (\d+) errored"
    ),
    "status": re.compile(r"status codes: (\d+) 2xx"),
    "finished": re.compile(r"finished in ([\d.]+)(m?s),"),
}


async def run_h2load(
    *,
    target: str,
    path: str,
    body: Path,
    token: str,
    seconds: float,
    in_flight: int,
    server_pid: int,
    redis_pid: int | None,
) -> H2Result:
    """``in_flight`` concurrent streams on one connection for ``seconds`` (h2load ``-D``,
    which also bounds the run: h2load stops sending when the time is up)."""
    backends = postgres_backends_of(server_pid)
    server = psutil.Process(server_pid)
    redis = [psutil.Process(redis_pid)] if redis_pid else []
    before = (process_cpu_seconds(server), _cpu(backends), _cpu(redis))
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        H2LOAD,
        "-c1",
        f"-m{in_flight}",
        f"-D{seconds:g}",
        f"-d{body}",
        "-H", "te: trailers",
        "-H", "content-type: application/grpc",
        "-H", f"authorization: Bearer {token}",
        f"http://{target}{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=seconds + 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    wall = time.perf_counter() - started
    after = (process_cpu_seconds(server), _cpu(backends), _cpu(redis))
    text = output.decode(errors="replace")
    requests = _NUMBERS["requests"].search(text)
    status = _NUMBERS["status"].search(text)
    finished = _NUMBERS["finished"].search(text)
    if process.returncode != 0 or requests is None or finished is None:
        raise RuntimeError(f"h2load failed ({process.returncode}):\n{text}")
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return H2Result(
        requests=int(requests.group(1)),
        succeeded=int(requests.group(2)),
        failed=int(requests.group(3)),
        errored=int(requests.group(4)),
        status_2xx=int(status.group(1)) if status else 0,
        seconds=min(elapsed, wall) or wall,
        server_cpu_s=after[0] - before[0],
        postgres_cpu_s=after[1] - before[1],
        redis_cpu_s=after[2] - before[2],
        report=text,
    )


async def redis_pid(url: str) -> int | None:
    """The Redis server's pid when it runs on this machine (``INFO server``)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    pid = int(info.get("process_id", 0))
    return pid if pid and psutil.pid_exists(pid) else None


async def request_log_statuses(database_url: str, method: str) -> dict[str, int]:
    """Calls of ``method`` in Ferrule's request log, by gRPC status name."""
    connection = await asyncpg.connect(
        database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    )
    try:
        rows = await connection.fetch(
            "SELECT status_code, count(*) FROM request_log WHERE method = $1 GROUP BY status_code",
            method,
        )
    finally:
        await connection.close()
    return {str(row[0]): int(row[1]) for row in rows}
