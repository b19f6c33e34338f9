"""What the rendered Kubernetes manifests promise, checked against the server and the image.

`make lint` validates their schema; these tests check that the pieces fit each other:
probes ask the health port the ConfigMap opens, the grace period outlasts preStop plus
the drain, every container runs as the image's non-root user on a read-only root, secrets
come from the Secret and never from the ConfigMap, and every key names a real setting.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from server.health import LIVENESS_SERVICE
from server.settings import Settings
from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "production")
SECRET_NAME = "ferrule-secrets"


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if IN_CI:
            pytest.fail("kubectl (kubectl kustomize) is missing (CI=true)", pytrace=False)
        pytest.skip("kubectl is not installed")
    path = REPO / "deploy" / "kubernetes" / "overlays" / overlay
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    data: dict[str, str] = configmap["data"]
    return data


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]


def setting_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def secret_settings() -> set[str]:
    """Settings typed as secrets, plus the URLs that carry passwords."""
    secret = {
        name.upper()
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    return secret | {"DATABASE_URL", "DATABASE_REPLICA_URLS", "REDIS_URL"}


def image_user() -> int:
    match = re.search(r"^USER (\d+):(\d+)$", (REPO / "Containerfile").read_text(), re.MULTILINE)
    assert match, "the Containerfile sets a numeric USER"
    return int(match.group(1))


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_every_piece_the_platform_expects_is_there(rendered: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert kinds >= {
        "Deployment",
        "Service",
        "Job",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceAccount",
    }
    services = {d["metadata"]["name"]: d["spec"] for d in rendered if d["kind"] == "Service"}
    headless = [spec for spec in services.values() if spec.get("clusterIP") == "None"]
    assert headless, "a headless Service for client-side round_robin"
    job = one(rendered, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_probes_are_native_grpc_on_the_health_port(rendered: list[dict[str, Any]]) -> None:
    data = config(rendered)
    health_port = int(data["FERRULE_HEALTH_LISTEN"].rpartition(":")[2])
    container = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
        assert isinstance(container[probe]["grpc"]["port"], int)
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    ports = {p["containerPort"] for p in container["ports"]}
    assert int(data["FERRULE_LISTEN"].rpartition(":")[2]) in ports
    assert int(data["FERRULE_METRICS_PORT"]) in ports
    assert health_port in ports


def test_grace_period_outlasts_pre_stop_and_the_drain(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config(rendered)["FERRULE_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_every_container_runs_as_the_image_user_locked_down(
    rendered: list[dict[str, Any]],
) -> None:
    uid = image_user()
    for pod in pod_specs(rendered):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"]
            assert container["resources"]["limits"]["memory"]


def test_secrets_come_only_from_the_secret(rendered: list[dict[str, Any]]) -> None:
    data = config(rendered)
    assert not set(data) & secret_settings()
    secret_names = set()
    for pod in pod_specs(rendered):
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if "value" in variable:  # a literal: never a secret's
                    assert variable["name"] not in secret_settings(), variable
                    continue
                reference = variable["valueFrom"]["secretKeyRef"]
                secret_names.add(reference["name"])
                assert reference["key"] == variable["name"]
    # One Secret; a generated one (dev) carries a hash suffix so that a change rolls pods.
    (secret_name,) = secret_names
    assert secret_name == SECRET_NAME or secret_name.startswith(SECRET_NAME + "-")
    container = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    referenced = {v["name"] for v in container["env"]}
    assert referenced == secret_settings() & setting_names()


def base_env_keys() -> tuple[set[str], set[str]]:
    """The keys base/ferrule.env sets, and those it lists commented out (unset by default)."""
    text = (REPO / "deploy" / "kubernetes" / "base" / "ferrule.env").read_text()
    keys = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    unset = set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    return keys, unset


def test_every_setting_is_in_the_configmap_or_the_secret() -> None:
    """An operator finds every knob where the manifests keep it: a setting added to
    server/settings.py without a line in base/ferrule.env (set, or commented out when it
    stays unset by default) or a Secret reference fails here."""
    keys, unset = base_env_keys()
    documented = keys | unset
    missing = setting_names() - secret_settings() - documented
    assert not missing, f"not in deploy/kubernetes/base/ferrule.env: {sorted(missing)}"
    assert not (keys | unset) & secret_settings(), "secrets belong in the Secret"
    assert not unset - setting_names(), sorted(unset - setting_names())


def test_every_configured_key_is_a_setting(rendered: list[dict[str, Any]]) -> None:
    unknown = {key for key in config(rendered) if not key.startswith("OTEL_")} - setting_names()
    assert not unknown, f"not settings of server/settings.py: {sorted(unknown)}"


#: What the operator's Secret would hold, shaped as each setting expects.
SECRET_PLACEHOLDERS = {
    "DATABASE_URL": "postgresql+asyncpg://ferrule@db.invalid/ferrule",
    "DATABASE_REPLICA_URLS": "postgresql+asyncpg://ferrule@replica.invalid/ferrule",
    "REDIS_URL": "redis://redis.invalid:6379/0",
}


def container_environment(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives `container`: its ConfigMaps, then its own `env`
    (which wins), with a placeholder for each Secret key it requires. Optional Secret keys
    are left out: the operator's Secret may lack them, and the pod must start anyway."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        reference = variable["valueFrom"]["secretKeyRef"]
        if not reference.get("optional", False):
            env[variable["name"]] = SECRET_PLACEHOLDERS.get(reference["key"], "placeholder")
    return env


def test_every_container_starts_with_the_environment_it_is_given(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server and the migration Job load their settings from what the manifests give
    them alone (the Job has no Redis, for one), as `ferrule-server` does at start."""
    for doc in rendered:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for name in list(os.environ):
                monkeypatch.delenv(name)
            for name, value in container_environment(rendered, container).items():
                monkeypatch.setenv(name, value)
            try:
                settings = Settings()
            except ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}", pytrace=False)
            if doc["kind"] == "Deployment":
                assert settings.plaintext_refusal() is None


def test_every_overlay_samples_traces_by_parent_and_ratio(rendered: list[dict[str, Any]]) -> None:
    """Tracing every RPC is the expensive setting (docs/sre.md); deployments sample."""
    data = config(rendered)
    assert data["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert 0 < float(data["OTEL_TRACES_SAMPLER_ARG"]) <= 0.1


def test_production_serves_tls_with_the_rls_role_redis_and_workers() -> None:
    docs = render("production")
    data = config(docs)
    assert data["DATABASE_APP_ROLE"] == "ferrule_app"
    assert data["FERRULE_ALLOW_INSECURE"] == "false"
    assert int(data["FERRULE_WORKERS"]) > 1
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for key in ("FERRULE_TLS_CERT_FILE", "FERRULE_TLS_KEY_FILE"):
        assert str(Path(data[key]).parent) in mounts
    redis = [v for v in container["env"] if v["name"] == "REDIS_URL"]
    assert redis[0]["valueFrom"]["secretKeyRef"].get("optional", False) is False


def test_compose_wires_every_service_and_only_settings() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "ferrule", "otel-collector", "jaeger"}
    assert services["migrate"]["command"] == ["migrate"]
    ferrule = services["ferrule"]
    assert ferrule["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = ferrule["environment"]
    assert {k for k in env if not k.startswith("OTEL_")} <= setting_names()
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")
    for published in ferrule["ports"]:
        assert published.startswith("127.0.0.1:"), "published on loopback only"
