"""The container image, built from the Containerfile on this machine and run (`make image-test`).

The image is built with buildah on a Debian base this test makes itself (no registry is
reachable), then run with `buildah run` against the host's PostgreSQL and Redis: the
migration as its own command, the server refusing a stale schema, SERVING on the standard
health service as seen from outside, an organization created through the real client,
the process's uid, and a clean SIGTERM. Everything it builds is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from ferrule.client import ClientConfig, FerruleClient
from ferrule.v1 import user_service_pb2 as upb
from tests.conftest import IN_CI
from tests.deploy.buildah import Buildah
from tests.deploy.debian_base import base_tarball
from tests.server.conftest import ADMIN_TOKEN, JWT_SECRET
from tests.server.process_helpers import free_port, wait_serving

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / "build"
#: The CA bundle through which this machine reaches PyPI; a minbase has none, so the
#: test's base image carries this one and points pip at it.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
IMAGE = "localhost/ferrule:image-test"
NON_ROOT_UID = 10001


@dataclass(frozen=True)
class BuiltImage:
    buildah: Buildah
    tag: str
    build_seconds: float


def _require_build_tools() -> None:
    missing = [tool for tool in ("buildah", "debootstrap", "tar") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (debootstrap and chroot isolation)")
    if missing:
        message = f"the image test needs {', '.join(missing)} (see `make system-deps`)"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing tool is a failure)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Iterator[BuiltImage]:
    _require_build_tools()
    BUILD_DIR.mkdir(exist_ok=True)
    buildah = Buildah(Path(tempfile.mkdtemp(prefix="image-test-", dir=BUILD_DIR)))
    try:
        tarball = base_tarball(BUILD_DIR / "image-base")
        base = f"localhost/ferrule-test-base:{tarball.stem}"
        buildah.import_rootfs(
            tarball,
            base,
            files={CA_BUNDLE: Path(CA_BUNDLE)},
            env={"PIP_CERT": CA_BUNDLE},
        )
        started = time.monotonic()
        buildah.build(REPO, IMAGE, {"BASE_IMAGE": base}, timeout=1200)
        built = BuiltImage(buildah, IMAGE, time.monotonic() - started)
        size = buildah("images", "--format", "{{.Size}}", IMAGE)
        # A figure for the record, not a check: shown past pytest's output capture.
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if capture is not None and reporter is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\n{IMAGE}: built in {built.build_seconds:.0f} s, {size}")
        yield built
    finally:
        buildah.clean_up()
    assert not buildah.root.exists()


def test_image_runs_ferrule_server_as_a_numeric_non_root_user(image: BuiltImage) -> None:
    inspected = image.buildah.inspect(image.tag)
    config = inspected["OCIv1"]["config"]
    assert config["Entrypoint"] == ["ferrule-server"]
    assert config["User"] == f"{NON_ROOT_UID}:{NON_ROOT_UID}"
    assert set(config["ExposedPorts"]) == {"50051/tcp", "9464/tcp"}
    # Orchestrators probe grpc.health.v1 instead of a HEALTHCHECK command.
    assert inspected["Docker"]["config"].get("Healthcheck") is None


def test_image_has_no_compiler(image: BuiltImage) -> None:
    container = image.buildah("from", image.tag)
    probe = "for c in cc gcc c++ g++ clang; do command -v $c && exit 1; done; exit 0"
    result = subprocess.run(
        image.buildah.run_argv(container, ["sh", "-c", probe], {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"compiler found in the runtime image: {result.stdout}"


def _processes_with(variable: str) -> list[int]:
    """Host pids whose environment holds `variable` (chroot isolation shares the pid space)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if variable.encode() in environ:
            pids.append(int(entry.name))
    return pids


def _status(pid: int, field: str) -> int:
    """The first number of a /proc/<pid>/status line (`Uid`: the real uid; `PPid`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} line for pid {pid}")


def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            return code
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"container process still running after {timeout}s")


def test_container_migrates_then_serves_against_host_postgres_and_redis(
    image: BuiltImage,
    empty_pg_database_url: str,
    redis_url: str,
    redis_namespace: str,
    tmp_path: Path,
) -> None:
    port, metrics_port, health_port = free_port(), free_port(), free_port()
    listen = f"127.0.0.1:{port}"  # loopback: the container shares the host's network
    env = {
        "DATABASE_URL": empty_pg_database_url,
        "REDIS_URL": redis_url,
        "FERRULE_CACHE_PREFIX": redis_namespace,
        "FERRULE_LISTEN": listen,
        "FERRULE_METRICS_HOST": "127.0.0.1",
        "FERRULE_METRICS_PORT": str(metrics_port),
        "FERRULE_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
        "FERRULE_JWT_SECRET": JWT_SECRET,
        "FERRULE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FERRULE_HEALTH_PROBE_SECONDS": "0.5",
        "FERRULE_GRACE_SECONDS": "5",
    }
    buildah = image.buildah
    container = buildah("from", image.tag)

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            buildah.run_argv(container, command, env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    # Migrations are a step of their own: a server on an empty schema refuses to start.
    refused = run("ferrule-server", "serve")
    assert refused.returncode == 3, refused.stderr[-2000:]
    assert "ferrule-server migrate" in refused.stderr
    migrated = run("ferrule-server", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert "ferrule: schema at" in migrated.stdout

    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            buildah.run_argv(container, ["ferrule-server", "serve"], env),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_serving(listen, timeout=60)
            wait_serving(f"127.0.0.1:{health_port}", timeout=10)  # what the probes ask
        except TimeoutError:
            pytest.fail(f"container never served:\n{log.read_text()[-4000:]}")

        config = ClientConfig(target=listen, token=ADMIN_TOKEN, default_timeout=10)
        with FerruleClient(config=config) as client:
            created = client.users.CreateOrganization(
                upb.CreateOrganizationRequest(
                    organization=upb.Organization(display_name="Made in a container")
                )
            )
            fetched = client.users.GetOrganization(upb.GetOrganizationRequest(name=created.name))
        assert fetched.display_name == "Made in a container"
        # The cached read went through the host's Redis, under this test's prefix.
        with redis.Redis.from_url(redis_url) as cache:
            assert any(cache.scan_iter(match=f"{redis_namespace}*", count=1000))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"rpc_server_call_duration_seconds" in r.read()

        serving = _processes_with(f"FERRULE_LISTEN={listen}")
        assert serving, "no process of the container found"
        assert {_status(pid, "Uid") for pid in serving} == {NON_ROOT_UID}
        assert all(Path(f"/proc/{pid}/root").resolve() != Path("/") for pid in serving)

        # SIGTERM to the server (not to children it may have): it drains and exits 0.
        (main,) = [pid for pid in serving if _status(pid, "PPid") not in serving]
        os.kill(main, signal.SIGTERM)
        assert _wait_exit(server, timeout=30) == 0, log.read_text()[-4000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
