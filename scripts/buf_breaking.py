"""Run `buf breaking` against the published contract, and against the previous commit.

The published contract is a buf image committed at contract/ferrule-v1.binpb: every
change is checked against it however many commits a submission holds, so a breaking
change cannot slip in by being split across commits. The image only moves forward on
purpose (`make contract-image`, after additive changes). The previous commit (or
`main`, on a branch) is checked too, as a second baseline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "contract" / "ferrule-v1.binpb"


def buf_binary() -> str:
    # Prefer the buf installed beside this interpreter (buf-bin in .venv), which is
    # found even when the venv is not activated.
    beside = Path(sys.executable).parent / "buf"
    buf = str(beside) if beside.is_file() else shutil.which("buf")
    if buf is None:
        sys.exit("buf not found (installed by buf-bin in .venv)")
    return buf


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT).returncode


def previous_commit() -> str | None:
    branch = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    ref = "HEAD~1" if branch in {"main", "HEAD"} else "main"
    for probe in (
        ["git", "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"],
        ["git", "cat-file", "-e", f"{ref}:protos"],
    ):
        if subprocess.run(probe, cwd=ROOT, capture_output=True).returncode != 0:
            return None
    return ref


def main() -> int:
    buf = buf_binary()
    if "--write-image" in sys.argv:
        return run([buf, "build", "protos", "--exclude-source-info", "-o", str(IMAGE)])
    if not IMAGE.is_file():
        sys.exit(f"{IMAGE.relative_to(ROOT)} is missing: run `make contract-image`")
    status = run([buf, "breaking", "protos", "--against", str(IMAGE)])
    ref = previous_commit()
    if ref is None:
        print("buf breaking: no previous commit with protos/ to compare against")
    else:
        status |= run([buf, "breaking", "protos", "--against", f".git#ref={ref},subdir=protos"])
    return status


if __name__ == "__main__":
    sys.exit(main())
