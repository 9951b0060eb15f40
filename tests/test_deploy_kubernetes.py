"""deploy/kubernetes: each manifest validated by kubernetes-validate --strict, plus the contract.

kubernetes-validate ships schemas for the built-in kinds only: for ServiceMonitor and
PrometheusRule (Prometheus Operator CRDs) and Kustomization it prints "Couldn't find schema"
and validates nothing. Those are checked here instead: the two CRDs against a strict subset of
their CRD's openAPIV3Schema (the fields these files use, unknown fields rejected, with
metadata and selectors checked against Kubernetes' own definitions from kubernetes-validate),
the PrometheusRule's groups against the promtool-checked rules file, and the Kustomization's
resource list against the directory.
"""

from __future__ import annotations

import posixpath
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import yaml
from conftest import tool
from kubernetes_validate import utils as kv  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
CRD_FILES = {"servicemonitor.yaml", "prometheusrule.yaml"}
NOT_KUBERNETES_OBJECTS = {"kustomization.yaml"}
UID = 10001
CONFIG_PATH = "/etc/keepwarm/keepwarm.yaml"


def load(name: str) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    assert len(docs) == 1, f"{name}: one object per file"
    document: dict[str, Any] = docs[0]
    return document


# --- kubernetes-validate ----------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_validate_strict(name: str) -> None:
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(K8S / name)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    if name in CRD_FILES | NOT_KUBERNETES_OBJECTS:
        # Nothing validated: no schema for this kind. Checked by the tests below instead.
        assert output == "" or "Couldn't find schema" in output, output
    else:
        # --quiet prints only problems; a missing schema would show as a WARN here.
        assert output == "", output


def test_every_manifest_is_known() -> None:
    builtin = {"configmap.yaml", "cronjob.yaml", "deployment.yaml", "secret.example.yaml", "service.yaml", "statefulset-sharded.yaml"}
    assert set(MANIFESTS) == builtin | CRD_FILES | NOT_KUBERNETES_OBJECTS


# --- the Prometheus Operator CRDs ----------------------------------------------------------------

DEFS = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def crd_object(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://kubernetes.io/api/keepwarm-subset/{kind}",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {"$ref": DEFS + "ObjectMeta"},
            "spec": spec,
        },
    }


# Subsets of monitoring.coreos.com/v1 as prometheus-operator's CRDs define them.
SERVICE_MONITOR = crd_object("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "required": ["selector", "endpoints"],
    "additionalProperties": False,
    "properties": {
        "selector": {"$ref": DEFS + "LabelSelector"},
        "jobLabel": {"type": "string"},
        "namespaceSelector": {
            "type": "object", "additionalProperties": False,
            "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
        },
        "endpoints": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string"},
                    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": DURATION,
                    "scrapeTimeout": DURATION,
                    "honorLabels": {"type": "boolean"},
                },
            },
        },
    },
})

PROMETHEUS_RULE = crd_object("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "labels": STRING_MAP,
                    "limit": {"type": "integer"},
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "additionalProperties": False,
                            "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                            "properties": {
                                "record": {"type": "string"},
                                "alert": {"type": "string"},
                                "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                                "for": DURATION,
                                "keep_firing_for": DURATION,
                                "labels": STRING_MAP,
                                "annotations": STRING_MAP,
                            },
                        },
                    },
                },
            },
        },
    },
})


def validate_crd(document: dict[str, Any], schema: dict[str, Any]) -> None:
    version = kv.latest_version()
    definitions = kv.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resources([
        (definitions["$id"], referencing.Resource.from_contents(definitions)),
    ])
    jsonschema.Draft202012Validator(schema, registry=registry).validate(document)


@pytest.mark.parametrize(
    ("name", "schema"),
    [("servicemonitor.yaml", SERVICE_MONITOR), ("prometheusrule.yaml", PROMETHEUS_RULE)],
)
def test_crd_against_its_schema_subset(name: str, schema: dict[str, Any]) -> None:
    validate_crd(load(name), schema)


def test_crd_subset_schema_rejects_what_the_crd_rejects() -> None:
    # Guards the check above: a misspelt field and a bad duration must not pass.
    monitor = load("servicemonitor.yaml")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(monitor, SERVICE_MONITOR)
    rule = load("prometheusrule.yaml")
    rule["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(rule, PROMETHEUS_RULE)
    rule = load("prometheusrule.yaml")
    rule["metadata"]["labelz"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(rule, PROMETHEUS_RULE)


def test_prometheusrule_carries_exactly_the_rules_file_groups() -> None:
    assert load("prometheusrule.yaml")["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


# --- kustomization ----------------------------------------------------------------------------

def test_kustomization_applies_one_variant_and_never_the_example_secret() -> None:
    kustomization = load("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images", "labels"}
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert all((K8S / r).is_file() for r in resources), resources
    assert set(resources) == set(MANIFESTS) - {"kustomization.yaml", "cronjob.yaml", "secret.example.yaml", "statefulset-sharded.yaml"}
    images = {image["name"] for image in kustomization.get("images", [])}
    assert images <= {"keepwarm"}


# --- the contract between the pieces -------------------------------------------------------------

def pod_spec(name: str) -> dict[str, Any]:
    obj = load(name)
    template = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    spec: dict[str, Any] = template["template"]["spec"]
    return spec


def check_hardened(spec: dict[str, Any]) -> None:
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any("subPath" in m or "subPathExpr" in m for m in mounts.values()), "subPath never updates"
    # The key: a Secret mounted as a directory, named by CREDENTIALS_DIRECTORY; not an env var.
    env = {e["name"]: e for e in container.get("env", [])}
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in env.values())
    assert "ANTHROPIC_API_KEY" not in env
    (secret_mount,) = [m for m in mounts.values() if "secret" in volumes[m["name"]]]
    assert env["CREDENTIALS_DIRECTORY"]["value"] == secret_mount["mountPath"]
    assert secret_mount["readOnly"] is True
    assert volumes[secret_mount["name"]]["secret"]["secretName"] == load("secret.example.yaml")["metadata"]["name"]
    assert "anthropic_api_key" in load("secret.example.yaml")["stringData"]
    # The config: the ConfigMap at the directory the command names.
    (config_mount,) = [m for m in mounts.values() if "configMap" in volumes[m["name"]]]
    assert config_mount["mountPath"] == posixpath.dirname(CONFIG_PATH)
    assert volumes[config_mount["name"]]["configMap"]["name"] == load("configmap.yaml")["metadata"]["name"]
    # Somewhere writable for the ledger, whatever the read-only root.
    ledger = posixpath.dirname(config_document()["ledger"]["path"])
    assert ledger in {m["mountPath"] for m in mounts.values()}


def config_document() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(load("configmap.yaml")["data"]["keepwarm.yaml"])
    return data


def test_deployment() -> None:
    deployment = load("deployment.yaml")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec("deployment.yaml")
    check_hardened(spec)
    (container,) = spec["containers"]
    assert container["args"] == ["run", "--config", CONFIG_PATH]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9464}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/healthz" and ports.get(http["port"], http["port"]) == 9464, probe


def test_deployment_selector_matches_its_pods() -> None:
    deployment = load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_cronjob() -> None:
    cronjob = load("cronjob.yaml")["spec"]
    assert cronjob["schedule"] == "*/4 * * * *"
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert 0 < cronjob["startingDeadlineSeconds"] < 240
    spec = pod_spec("cronjob.yaml")
    check_hardened(spec)
    (container,) = spec["containers"]
    assert container["args"] == ["once", "--config", CONFIG_PATH]
    assert spec["restartPolicy"] == "Never"
    (daemon,) = pod_spec("deployment.yaml")["containers"]
    assert container["securityContext"] == daemon["securityContext"]
    assert container["image"] == daemon["image"]


def test_config_listens_on_all_interfaces_and_names_existing_prompts() -> None:
    data = load("configmap.yaml")["data"]
    config = config_document()
    assert config["metrics"]["listen"] == "0.0.0.0:9464"
    files = [block["file"] for expert in config["experts"] for block in expert["system"] if "file" in block]
    assert len(files) >= 2
    assert all(name in data for name in files), "every prompt file is a key of the ConfigMap"
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) for key in data)


def test_configmap_config_is_accepted_by_the_daemon(tmp_path: Path) -> None:
    # Lay the ConfigMap out as its volume does (one file per key) and load it with the
    # daemon's own strict loader: an unknown key or a missing prompt would be a ConfigError.
    from keepwarm.config import load_config

    for key, value in load("configmap.yaml")["data"].items():
        (tmp_path / key).write_text(value)
    config = load_config(tmp_path / "keepwarm.yaml")
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9464)
    assert str(config.ledger_path) == config_document()["ledger"]["path"]
    assert len(config.pairs) >= 2


def test_service_and_servicemonitor_reach_the_pods() -> None:
    service = load("service.yaml")
    # Prometheus Operator names the job after the Service: the alerts look for job="keepwarm".
    assert service["metadata"]["name"] == "keepwarm"
    pod_labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 9464 and port["targetPort"] == "metrics" and port["name"] == "metrics"
    monitor = load("servicemonitor.yaml")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    assert 'up{job="keepwarm"}' in RULES.read_text()


def test_uid_matches_the_image() -> None:
    user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user and int(user.group(1)) == UID
