"""Throwaway PostgreSQL clusters (a primary and its streaming replica) and PgBouncer.

Everything lives in a fresh temporary directory, listens on 127.0.0.1 on a free port,
runs as the ``postgres`` OS user when the tests run as root (PostgreSQL refuses root),
and is stopped by its own pid or ``pg_ctl stop``: nothing else on the machine is
touched. A missing binary skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.server.process_helpers import free_port

PG_BIN = Path(os.environ.get("FERRULE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PGBOUNCER = Path(os.environ.get("FERRULE_TEST_PGBOUNCER", "/usr/sbin/pgbouncer"))
OS_USER = "postgres"


def require_binary(path: Path, package: str) -> Path:
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"{path} not found (Debian package {package!r})"
    if IN_CI:
        pytest.fail(message + "; CI=true: the project's setup must install it", pytrace=False)
    pytest.skip(message)


def _as_postgres() -> list[str]:
    """Command prefix dropping root to the postgres user (exec, no fork: pids stay ours)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", "--"]


def _run(*args: str | Path, timeout: float = 60) -> None:
    command = [*_as_postgres(), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _private_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        user = pwd.getpwnam(OS_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o700)
    return path


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Cluster:
    data_dir: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this cluster."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """asyncpg DSN of ``database`` on this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        log = self.data_dir / "server.log"
        _run(PG_BIN / "pg_ctl", "start", "-w", "-t", "60", "-D", self.data_dir, "-l", log)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _run(PG_BIN / "pg_ctl", "stop", "-w", "-m", "fast", "-D", self.data_dir)

    def processes(self) -> list[int]:
        """This cluster's postmaster and its children (backends, background workers), by
        the pid in its own postmaster.pid: no other process on the machine."""
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        children: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                # The fields after the command name (which may hold spaces and parens).
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    children.append(int(entry.name))
        return [postmaster, *children]

    def freeze(self) -> list[int]:
        """SIGSTOP the cluster (postmaster first, so it forks nothing more): connections
        stay open and accepted, nothing answers. Returns the pids for :meth:`thaw`."""
        postmaster, *_ = self.processes()
        os.kill(postmaster, signal.SIGSTOP)
        pids = self.processes()  # listed once the postmaster can fork no more
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _configure(data_dir: Path, port: int) -> None:
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# ferrule test cluster\n"
            f"port = {port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{data_dir}'\n"
            "wal_level = replica\n"
            "max_wal_senders = 5\n"
            "hot_standby = on\n"
            "fsync = off\n"
            "full_page_writes = off\n"
            "max_connections = 100\n"
        )


@contextlib.contextmanager
def primary_and_replica() -> Iterator[tuple[Cluster, Cluster]]:
    """A fresh primary (initdb, trust on 127.0.0.1, replication allowed) and a streaming
    replica of it (pg_basebackup -R), both running; stopped and deleted afterwards."""
    for name in ("initdb", "pg_ctl", "pg_basebackup", "postgres"):
        require_binary(PG_BIN / name, "postgresql-15")
    base = _private_dir("ferrule-pg-")
    primary = Cluster(base / "primary", free_port())
    replica = Cluster(base / "replica", free_port())
    started: list[Cluster] = []
    try:
        _run(
            PG_BIN / "initdb",
            "-D",
            primary.data_dir,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        _configure(primary.data_dir, primary.port)
        primary.start()
        started.append(primary)
        _run(
            PG_BIN / "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            replica.data_dir,
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        _configure(replica.data_dir, replica.port)
        replica.start()
        started.append(replica)
        yield primary, replica
    finally:
        for cluster in reversed(started):
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def standalone_cluster() -> Iterator[Cluster]:
    """One fresh cluster (no replica), running; the test may stop and start it at will."""
    for name in ("initdb", "pg_ctl", "postgres"):
        require_binary(PG_BIN / name, "postgresql-15")
    base = _private_dir("ferrule-pg-standalone-")
    cluster = Cluster(base / "data", free_port())
    try:
        _run(
            PG_BIN / "initdb",
            "-D",
            cluster.data_dir,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        _configure(cluster.data_dir, cluster.port)
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class PgBouncer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def pgbouncer(
    upstream_host: str, upstream_port: int, *, pool_mode: str = "transaction", pool_size: int = 3
) -> Iterator[PgBouncer]:
    """PgBouncer on a free port in front of every database of ``upstream``, trust auth."""
    binary = require_binary(PGBOUNCER, "pgbouncer")
    directory = _private_dir("ferrule-pgbouncer-")
    port = free_port()
    users = directory / "users.txt"
    users.write_text('"postgres" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={upstream_host} port={upstream_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {users}\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {pool_size}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        "max_client_conn = 500\n"
        "server_reset_query =\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        "admin_users = postgres\n"
    )
    if os.geteuid() == 0:
        user = pwd.getpwnam(OS_USER)
        for path in (users, ini):
            os.chown(path, user.pw_uid, user.pw_gid)
    process = subprocess.Popen(
        [*_as_postgres(), str(binary), str(ini)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            wait_port(port)
        except TimeoutError:
            process.kill()
            _, err = process.communicate(timeout=10)
            raise RuntimeError(f"pgbouncer did not start: {err.decode(errors='replace')}") from None
        yield PgBouncer(port=port, process=process, directory=directory)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
