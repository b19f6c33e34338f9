"""The image test's base image, made here: there is no registry to pull `python:slim` from.

`debootstrap --variant=minbase bookworm` with Debian's python3 and python3-venv is the
same Python (3.11) on the same distribution as the official slim image. The root
filesystem is kept as a tarball under `build/image-base/`, named by a hash of the recipe
below, so a second run reuses it and a changed recipe (or a fresh checkout) builds anew.
The debootstrap directory itself is deleted as soon as the tarball exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
#: Removed after debootstrap: package caches and documentation nothing in the image reads.
PRUNED = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPE_VERSION = 1


def machine_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt uses (DEBIAN_MIRROR overrides it).

    debootstrap fetches from a mirror URL, not through apt's configuration, so the URL
    that apt already reaches from here is the one most likely to work."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    files = sorted((sources / "sources.list.d").glob("*.sources"))
    for path in files:
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    legacy = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in legacy:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    return DEFAULT_MIRROR


def recipe_key(mirror: str) -> str:
    recipe = f"{RECIPE_VERSION}|{SUITE}|minbase|{','.join(PACKAGES)}|{','.join(PRUNED)}|{mirror}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def base_tarball(cache_dir: Path, timeout: float = 900) -> Path:
    """The cached root filesystem tarball, built with debootstrap when missing."""
    mirror = machine_mirror()
    tarball = cache_dir / f"debian-{SUITE}-python-{recipe_key(mirror)}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
    try:
        rootfs = work / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        for relative in PRUNED:
            target = rootfs / relative
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
        partial = work / "rootfs.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        os.replace(partial, tarball)  # atomic: a concurrent run sees all of it or nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stale in cache_dir.glob(f"debian-{SUITE}-python-*.tar"):  # older recipes' bases
        if stale != tarball:
            stale.unlink(missing_ok=True)
    return tarball
