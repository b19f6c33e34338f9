"""Run `buf breaking` against the contract as it stood on main.

On a feature branch the baseline is `main`; on main itself it is the previous commit
(so CI on main checks the last change). Without such a commit (the very first one, or
a shallow clone) there is nothing to compare against and the check says so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    ref = "HEAD~1" if branch in {"main", "HEAD"} else "main"
    probe = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"], capture_output=True
    )
    if probe.returncode != 0:
        print(f"buf breaking: no baseline commit {ref!r}; nothing to compare")
        return 0
    has_protos = subprocess.run(["git", "cat-file", "-e", f"{ref}:protos"], capture_output=True)
    if has_protos.returncode != 0:
        print(f"buf breaking: {ref} has no protos/; nothing to compare")
        return 0
    # Prefer the buf installed beside this interpreter (buf-bin in .venv), which is
    # found even when the venv is not activated.
    beside = Path(sys.executable).parent / "buf"
    buf = str(beside) if beside.is_file() else shutil.which("buf")
    if buf is None:
        sys.exit("buf not found (installed by buf-bin in .venv)")
    cmd = [buf, "breaking", "protos", "--against", f".git#ref={ref},subdir=protos"]
    print("+", " ".join(cmd))
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
