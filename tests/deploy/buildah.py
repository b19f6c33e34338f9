"""Buildah as the image test drives it: vfs storage in a private root, chroot isolation.

No container engine runs on the test machines and none is needed: Debian's buildah builds
OCI images from the Containerfile and runs commands in them without a daemon. `vfs`
needs no kernel overlay support, and `chroot` isolation needs no user namespaces; it
shares the host's network, which is how the container reaches PostgreSQL and Redis on
127.0.0.1. A private storage root per test run keeps the machine's own image store out
of it and makes clean-up one directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class BuildahError(RuntimeError):
    pass


@dataclass(frozen=True)
class Buildah:
    root: Path

    @property
    def global_args(self) -> list[str]:
        return [
            "buildah",
            "--storage-driver",
            "vfs",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
        ]

    def __call__(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [*self.global_args, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise BuildahError(
                f"buildah {' '.join(args[:2])} failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result.stdout.strip()

    def import_rootfs(
        self, tarball: Path, tag: str, *, files: Mapping[str, Path], env: Mapping[str, str]
    ) -> None:
        """An image from a root filesystem tarball, plus single files and environment."""
        container = self("from", "scratch")
        try:
            self("add", container, str(tarball), "/")
            for destination, source in files.items():
                self("copy", container, str(source), destination)
            config = [f"--env={name}={value}" for name, value in env.items()]
            self("config", *config, "--cmd", '["python3"]', container)
            self("commit", "--quiet", container, tag)
        finally:
            self("rm", container)

    def build(self, context: Path, tag: str, build_args: Mapping[str, str], timeout: float) -> None:
        args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        self(
            "bud",
            "--isolation",
            "chroot",
            "--layers=false",
            "--quiet",
            *args,
            "--file",
            str(context / "Containerfile"),
            "--tag",
            tag,
            str(context),
            timeout=timeout,
        )

    def run_argv(self, container: str, command: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """The command line that runs `command` in `container` (for Popen)."""
        env_args = [f"--env={name}={value}" for name, value in env.items()]
        return [
            *self.global_args,
            "run",
            "--isolation",
            "chroot",
            *env_args,
            container,
            "--",
            *command,
        ]

    def inspect(self, image: str) -> dict[str, Any]:
        """`buildah inspect` of an image: its OCI and Docker configurations, among others."""
        parsed: dict[str, Any] = json.loads(self("inspect", "--type", "image", image))
        return parsed

    def clean_up(self) -> None:
        """Remove every container and image of this root, then the root itself."""
        try:
            self("rm", "--all")
            self("rmi", "--all", "--force")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
