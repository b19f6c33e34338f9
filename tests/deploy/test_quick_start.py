"""The README's quick start, followed as a new user would, in a fresh clone.

`git clone` of this repository, `make run` (which runs `make setup`: a real install into
the clone's own .venv, no reuse), the printed grpcurl call made with its exact header,
body, target and method (grpcurl is not installed here: the call goes through a generic
gRPC channel, the request parsed from the printed JSON as grpcurl would), then the JWT
steps: a secret, `make run` again (development mode now off), `ferrule-server token`, and
that token accepted by the server.

Two deviations, both for a shared test machine: `FERRULE_LISTEN` is a free loopback port
instead of 50051, and the clone is of the committed HEAD (uncommitted changes are not in
it).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from ferrule.client import ClientConfig, FerruleClient, Unauthenticated
from ferrule.v1 import user_service_pb2 as upb
from tests.server.process_helpers import free_port, wait_serving

REPO = Path(__file__).resolve().parents[2]
#: `make setup` in a fresh clone downloads and installs every dependency.
SETUP_TIMEOUT = 900


def quick_start_commands() -> list[str]:
    """Every line of the shell blocks in the README's "Quick start" section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


@dataclass
class MakeRun:
    process: subprocess.Popen[bytes]
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text(), re.MULTILINE)
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"`make run` never printed {pattern!r}:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    target = tmp_path / "ferrule"
    subprocess.run(
        ["git", "clone", "--quiet", str(REPO), str(target)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


@pytest.fixture
def user_env() -> dict[str, str]:
    """This machine's environment without any Ferrule setting: a newcomer's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FERRULE_", "DATABASE_", "REDIS_", "OTEL_", "VIRTUAL_ENV"))
    }
    env["FERRULE_LISTEN"] = f"127.0.0.1:{free_port()}"
    return env


@pytest.fixture
def make_run() -> Iterator[list[MakeRun]]:
    runs: list[MakeRun] = []
    yield runs
    for run in runs:
        run.stop()


def start_make_run(clone: Path, env: dict[str, str], output: Path) -> MakeRun:
    with output.open("wb") as sink:
        process = subprocess.Popen(
            ["make", "run"],
            cwd=clone,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return MakeRun(process, output)


def call_like_grpcurl(command: str) -> upb.Organization:
    """Make the call a pasted grpcurl command makes: same header, JSON body, target, method."""
    argv = shlex.split(command)
    assert argv[:2] == ["grpcurl", "-plaintext"], argv
    header = argv[argv.index("-H") + 1]
    body = argv[argv.index("-d") + 1]
    target, method = argv[-2], argv[-1]
    key, _, value = header.partition(":")
    assert method == "ferrule.v1.UserService/CreateOrganization"
    request = json_format.Parse(body, upb.CreateOrganizationRequest())
    with grpc.insecure_channel(target) as channel:
        create = channel.unary_unary(
            f"/{method}",
            request_serializer=upb.CreateOrganizationRequest.SerializeToString,
            response_deserializer=upb.Organization.FromString,
        )
        reply: upb.Organization = create(
            request, metadata=((key.strip().lower(), value.strip()),), timeout=10
        )
    return reply


def test_readme_quick_start_in_a_fresh_clone(
    clone: Path, user_env: dict[str, str], make_run: list[MakeRun], tmp_path: Path
) -> None:
    commands = quick_start_commands()
    assert "make run" in commands
    secret_line = next(c for c in commands if c.startswith("export FERRULE_JWT_SECRET="))
    token_line = next(c for c in commands if "ferrule-server token" in c)
    listen = user_env["FERRULE_LISTEN"]

    # 1. `make run`: development mode, a token and a call to paste.
    first = start_make_run(clone, user_env, tmp_path / "first.log")
    make_run.append(first)
    pasted = first.wait_for(r"^\s*(grpcurl .*)$", SETUP_TIMEOUT).group(1)
    dev_token = (clone / ".ferrule-dev-token").read_text().strip()
    assert dev_token in first.text()
    assert "development mode is off as soon as" in first.text()

    organization = call_like_grpcurl(pasted)
    assert organization.display_name == "My first organization"
    org_id = organization.name.removeprefix("organizations/")
    # Nothing the run created is left for `git add` to pick up by mistake.
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    )
    assert status.stdout == ""
    first.stop()

    # The next `make run` reuses the token: a pasted command keeps working.
    again = start_make_run(clone, user_env, tmp_path / "again.log")
    make_run.append(again)
    assert again.wait_for(r"^\s*(grpcurl .*)$", 120).group(1) == pasted
    assert call_like_grpcurl(pasted).display_name == "My first organization"
    again.stop()

    # 2. A JWT secret, exactly as the README makes it, and `make run` again.
    secret = subprocess.run(
        ["bash", "-c", f'{secret_line} && printf %s "$FERRULE_JWT_SECRET"'],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert len(secret) == 64
    env = {**user_env, "FERRULE_JWT_SECRET": secret}
    second = start_make_run(clone, env, tmp_path / "second.log")
    make_run.append(second)
    second.wait_for(r"^ferrule: serving on ", 120)
    wait_serving(listen, timeout=60)
    assert "development mode (" not in second.text()

    # 3. `ferrule-server token`, as printed in the README, for the organization made in 1.
    token_command = token_line.replace("<organization id>", org_id)
    minted = subprocess.run(
        ["bash", "-c", token_command],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert minted.returncode == 0, minted.stderr
    config = ClientConfig(target=listen, token=minted.stdout.strip(), max_attempts=1)
    with FerruleClient(config=config) as client:
        fetched = client.users.GetOrganization(upb.GetOrganizationRequest(name=organization.name))
        listed = client.users.ListUsers(upb.ListUsersRequest(parent=organization.name))
    assert fetched.display_name == "My first organization"
    assert list(listed.users) == []
    # Development mode is off: the development token no longer opens anything.
    config = ClientConfig(target=listen, token=dev_token, max_attempts=1)
    with FerruleClient(config=config) as client, pytest.raises(Unauthenticated):
        client.users.ListOrganizations(upb.ListOrganizationsRequest())
