"""The published client installs from its wheel into a clean environment, without the server.

Builds ``client/`` into a wheel, installs it (dependencies from the configured package
index) into a fresh virtual environment, and checks there that the stubs and the client
import and work while SQLAlchemy, asyncpg and the server's packages are absent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent(
    """
    import importlib
    import sys

    import ferrule
    import ferrule.client
    from ferrule.client import ClientConfig, FerruleClient, Unavailable
    from ferrule.v1 import (
        analysis_service_pb2, analysis_service_pb2_grpc,
        health_service_pb2, health_service_pb2_grpc,
        prediction_service_pb2, prediction_service_pb2_grpc,
        user_service_pb2, user_service_pb2_grpc,
    )

    assert ferrule.__file__.startswith(sys.prefix), ferrule.__file__

    for name in ("sqlalchemy", "asyncpg", "server", "db"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        raise SystemExit(f"{name} is importable in the client-only environment")

    # A call to a closed port fails fast with the typed error: the whole layer works.
    config = ClientConfig(target="127.0.0.1:1", max_attempts=1, default_timeout=5)
    with FerruleClient(config=config) as client:
        request = user_service_pb2.GetUserRequest(name="organizations/o/users/u")
        try:
            client.users.GetUser(request)
        except Unavailable:
            pass
        else:
            raise SystemExit("a call to a closed port succeeded")
    print("client-only environment OK")
    """
)


def run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_and_works_without_server_dependencies(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, REPO / "client", cwd=tmp_path)
    (wheel,) = dist.glob("ferrule_client-*.whl")

    # No pip inside the venv (ensurepip is slow): this interpreter's pip installs into it.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel, cwd=tmp_path)

    # -I: no PYTHONPATH, no user site, no current directory on sys.path.
    out = run(python, "-I", "-c", CHECK, cwd=tmp_path)
    assert "client-only environment OK" in out


def _floor(requirement_prefix: str) -> tuple[int, ...]:
    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name, _, spec = requirement.partition(">=")
        if name == requirement_prefix:
            return tuple(int(part) for part in spec.split(",")[0].split("."))
    raise AssertionError(f"{requirement_prefix} has no >= floor in client/pyproject.toml")


def test_dependency_floors_cover_the_generated_stubs() -> None:
    """The stubs refuse older grpcio/protobuf at import time, so the floors must match."""
    stubs = REPO / "client" / "ferrule" / "v1"
    grpc_versions = set()
    for path in stubs.glob("*_pb2_grpc.py"):
        found = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())
        assert found is not None, path
        grpc_versions.add(tuple(int(p) for p in found.group(1).split(".")))
    protobuf_versions = set()
    for path in stubs.glob("*_pb2.py"):
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text()
        )
        assert found is not None, path
        protobuf_versions.add(tuple(int(p) for p in found.groups()))
    assert grpc_versions
    assert protobuf_versions
    assert _floor("grpcio") >= max(grpc_versions)
    assert _floor("grpcio-status") >= max(grpc_versions)
    assert _floor("protobuf") >= max(protobuf_versions)
