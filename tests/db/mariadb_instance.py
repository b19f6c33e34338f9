"""A throwaway MariaDB server (its own data directory, a free port on 127.0.0.1), for
tests that must stop or restart the database; the shared server is never touched.

Stopped by its own pid. A missing binary skips locally and fails under ``CI=true``.
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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IN_CI

MARIADBD = Path("/usr/sbin/mariadbd")
INSTALL_DB = Path("/usr/bin/mariadb-install-db")
#: mariadbd refuses to run as root; the Debian package's user owns the data directory.
OS_USER = "mysql"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _require(path: Path) -> None:
    if not (path.is_file() and os.access(path, os.X_OK)):
        message = f"{path} not found (Debian package 'mariadb-server')"
        if IN_CI:
            pytest.fail(message + "; CI=true: the machine must have it", pytrace=False)
        pytest.skip(message)


@dataclass
class MariaDBInstance:
    directory: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mariadb+asyncmy://root@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(MARIADBD), "--no-defaults", f"--datadir={self.directory / 'data'}",
                f"--port={self.port}", "--bind-address=127.0.0.1",
                f"--socket={self.directory / 'sock'}", f"--pid-file={self.directory / 'pid'}",
                f"--user={OS_USER}", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "server.log").open("ab"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded: until it accepts connections
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError((self.directory / "server.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.process = None


@contextlib.contextmanager
def mariadb_instance() -> Iterator[MariaDBInstance]:
    _require(MARIADBD)
    _require(INSTALL_DB)
    directory = Path(tempfile.mkdtemp(prefix="ferrule-mariadb-"))
    user = pwd.getpwnam(OS_USER) if os.geteuid() == 0 else None
    if user is not None:
        os.chown(directory, user.pw_uid, user.pw_gid)
    subprocess.run(
        [
            str(INSTALL_DB), "--no-defaults", f"--datadir={directory / 'data'}",
            f"--user={OS_USER}", "--auth-root-authentication-method=normal", "--skip-test-db",
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    instance = MariaDBInstance(directory)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)
