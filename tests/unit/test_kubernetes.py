"""The Kubernetes kit (deploy/kubernetes, docs/deployment/kubernetes.md), offline: each overlay
renders with ``kubectl kustomize``; the core objects pass kubernetes-validate (the API's own
schemas), the KEDA and Prometheus Operator objects their typed models; the manifests keep what
the worker needs (probes, secrets as files, a grace period covering the shutdown, the rules of
docs/prometheus). The KEDA trigger's query against the real broker: tests/integration/
test_keda_trigger.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lis_async.settings.model import ConnectorSettings, OpenCTISettings, all_env_names
from tests.kube import (
    KIT,
    OVERLAYS,
    ROOT,
    config_env,
    container,
    generator,
    one,
    registration_budget_s,
    render,
    shutdown_budget_s,
)

#: The Kubernetes version the core objects are checked against: the oldest still supported
#: upstream when this was written (unhealthyPodEvictionPolicy is GA there).
KUBERNETES_VERSION = "1.31.0"
CORE_KINDS = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
SECRET_FILES = {"OPENCTI_TOKEN_FILE", "CONFIG_LIS_APIKEY_CTI_FILE"}


def typed_model(kind: str) -> Any:
    """The typed model of a custom resource (cloudcoil's, generated from the CRDs)."""
    if kind in ("ScaledObject", "TriggerAuthentication"):
        from cloudcoil.models.keda import v1alpha1 as keda

        return getattr(keda, kind)
    from cloudcoil.models.prometheus_operator import v1 as prom

    return getattr(prom, kind)


def drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_core_objects_validate(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert CORE_KINDS | {"ServiceMonitor", "PrometheusRule"} <= kinds
    assert ("ScaledObject" in kinds) == (overlay == "cluster")
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_core_validation_can_fail() -> None:
    import kubernetes_validate

    deployment = one(render("single"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_fit_their_typed_models(overlay: str) -> None:
    """Each field is one the model knows: the model's dump of the object is the object (an
    unknown or misspelt field would be dropped)."""
    for obj in render(overlay):
        if obj["kind"] in CORE_KINDS:
            continue
        model = typed_model(obj["kind"]).model_validate(obj)
        dumped = drop_nulls(model.model_dump(mode="json", by_alias=True, exclude_unset=True))
        assert dumped == obj, obj["kind"]


def test_typed_models_see_a_misspelt_field() -> None:
    scaled = one(render("cluster"), "ScaledObject")
    scaled["spec"]["minReplicasCount"] = 1
    model = typed_model("ScaledObject").model_validate(scaled)
    assert drop_nulls(model.model_dump(mode="json", by_alias=True, exclude_unset=True)) != scaled


# ----------------------------------------------------------------------------- the Deployment
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(overlay: str) -> None:
    c = container(render(overlay))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = config_env(render(overlay))
    assert ports["health"] == int(env["CONNECTOR_HEALTH_PORT"])
    assert ports["metrics"] == int(env["CONNECTOR_METRICS_PORT"])
    assert env["CONNECTOR_EXPOSE_METRICS"] == "true"
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),  # never /readyz: 503 during an OpenCTI outage
        ("readinessProbe", "/readyz"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": "health"}, probe


def test_startup_probe_covers_the_registration() -> None:
    probe = container(render("single"))["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    timeout = OpenCTISettings.model_fields["timeout_s"].default
    assert window >= registration_budget_s(timeout)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_shutdown(overlay: str) -> None:
    objects = render(overlay)
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    env = config_env(objects)
    default = ConnectorSettings.model_fields["shutdown_timeout_s"].default
    drain = float(env.get("CONNECTOR_SHUTDOWN_TIMEOUT_S", default))
    assert spec["terminationGracePeriodSeconds"] >= shutdown_budget_s(drain)


def test_shutdown_budget_counts_every_step() -> None:
    # 30 s of drain, the mover's 2 steps, 2 more steps, 8 closes: a guard on the counting itself.
    assert shutdown_budget_s(30.0) == 30.0 + (2 + 1 + 1 + 8) * 10.0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hardened(overlay: str) -> None:
    spec = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    c = spec["containers"][0]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_files(overlay: str) -> None:
    objects = render(overlay)
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    known = set(all_env_names())
    assert SECRET_FILES <= set(env) and SECRET_FILES <= known
    secret_mounts = {
        m["mountPath"]: m
        for m in c["volumeMounts"]
        if "secret" in next(v for v in spec["volumes"] if v["name"] == m["name"])
    }
    for name in SECRET_FILES:
        path = Path(env[name]["value"])
        mount = secret_mounts[str(path.parent)]
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert path.name in {i["path"] for i in volume["secret"]["items"]}
    # The values themselves are never in the environment or the ConfigMap.
    names = set(env) | set(config_env(objects))
    assert not names & {"OPENCTI_TOKEN", "CONFIG_LIS_APIKEY_CTI", "LASTINFOSEC_API_KEY_CTI"}
    assert names <= known, sorted(names - known)


# ----------------------------------------------------------------------------- the others
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_the_pods(overlay: str) -> None:
    objects = render(overlay)
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"] and service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    for kind, path in (
        ("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
        ("NetworkPolicy", ("spec", "podSelector", "matchLabels")),
    ):
        node: Any = one(objects, kind)
        for key in path:
            node = node[key]
        assert node and node.items() <= labels.items(), kind
    monitor = one(objects, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert one(objects, "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == (
        "AlwaysAllow"
    )


def _ports(rules: list[dict[str, Any]]) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for rule in rules for p in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy(overlay: str) -> None:
    objects = render(overlay)
    policy = one(objects, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    c = container(objects)
    assert _ports(policy["ingress"]) == {(p["containerPort"], "TCP") for p in c["ports"]}
    expected = {(53, "UDP"), (53, "TCP"), (5672, "TCP"), (5671, "TCP"), (8080, "TCP")}
    expected |= {(443, "TCP")}  # LastInfoSec
    if overlay == "cluster":
        expected |= {(6379, "TCP")}  # Redis
    assert _ports(policy["egress"]) == expected
    for rule in policy["ingress"] + policy["egress"]:
        assert rule["ports"], "a rule without ports would open every port"


def test_cluster_overlay_sets_redis_from_a_secret() -> None:
    env = {e["name"]: e for e in container(render("cluster"))["env"]}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"]
    assert "REDIS_URL" not in {e["name"] for e in container(render("single")).get("env", [])}


def test_scaled_object() -> None:
    objects = render("cluster")
    scaled = one(objects, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    assert scaled["minReplicaCount"] == 1  # the heartbeat and the lane's consumer
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["protocol"] == "http"
    assert meta["useRegex"] == "true" and meta["operation"] == "sum"
    assert meta["excludeUnacknowledged"] == "true"
    auth = one(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


# ----------------------------------------------------------------------------- the alert rules
def test_prometheus_rule_is_generated_from_the_alerts() -> None:
    gen = generator()
    stale = "deploy/kubernetes/base/prometheusrule.yaml is stale: run deploy/kubernetes/generate.py"
    assert (KIT / "base" / "prometheusrule.yaml").read_text(encoding="utf-8") == gen.render(), stale
    source = yaml.safe_load((ROOT / "docs/prometheus/lis-async-alerts.yml").read_text())
    rule = one(render("single"), "PrometheusRule")
    assert rule["spec"]["groups"] == source["groups"]


def test_generator_check_mode(tmp_path: Path) -> None:
    """``generate.py --check`` fails on a stale file (the CLI a maintainer runs)."""
    script = KIT / "generate.py"
    done = subprocess.run(
        ["python3", str(script), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    gen: Any = generator()  # a module loaded from its path
    gen.TARGET = tmp_path / "prometheusrule.yaml"
    gen.TARGET.write_text(gen.render().replace("severity: warning", "severity: info", 1))
    assert gen.main(["--check"]) == 1


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus; .ci/run does it)")
    rule = one(render("cluster"), "PrometheusRule")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
