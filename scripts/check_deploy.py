"""`make lint`'s deployment checks, all offline.

- every kustomization under deploy/kubernetes (the base and each overlay) is rendered with
  `kubectl kustomize` and validated with `kubernetes-validate --strict` against
  Kubernetes 1.30 (the oldest version the manifests support: native preStop sleep) and
  the newest schema kubernetes-validate ships;
- the Containerfile passes hadolint;
- compose.yaml validates against the Compose Specification's schema
  (deploy/compose/compose-spec.json, vendored; see deploy/compose/README.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kubernetes_validate import latest_version

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
OLDEST_KUBERNETES = "1.30.0"


def kustomizations() -> list[Path]:
    return sorted(path.parent for path in KUBERNETES_DIR.rglob("kustomization.yaml"))


def run(command: list[str]) -> bool:
    print("+", " ".join(str(part) for part in command), flush=True)
    return subprocess.run(command, check=False).returncode == 0


def render(kustomization: Path, out: Path) -> bool:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl not found: it renders the kustomizations (`kubectl kustomize`)")
        return False
    print("+ kubectl kustomize", kustomization.relative_to(REPO), flush=True)
    result = subprocess.run(
        [kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        print(result.stderr)
        return False
    out.write_text(result.stdout)
    return True


def main() -> int:
    ok = True
    versions = sorted({OLDEST_KUBERNETES, latest_version()})
    with tempfile.TemporaryDirectory() as tmp:
        for kustomization in kustomizations():
            name = "-".join(kustomization.relative_to(KUBERNETES_DIR).parts)
            rendered = Path(tmp) / f"{name}.yaml"
            if not render(kustomization, rendered):
                ok = False
                continue
            for version in versions:
                validate = [BIN / "kubernetes-validate", "--strict", "--quiet", "-k", version]
                ok &= run([*map(str, validate), str(rendered)])
    ok &= run([str(BIN / "hadolint"), str(REPO / "Containerfile")])
    schema = REPO / "deploy" / "compose" / "compose-spec.json"
    ok &= run(
        [str(BIN / "check-jsonschema"), "--schemafile", str(schema), str(REPO / "compose.yaml")]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
