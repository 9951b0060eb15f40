"""deploy/kubernetes: every overlay built with `kubectl kustomize`, validated by
kubernetes-validate --strict, scanned by checkov, and the contract between the pieces.

kubernetes-validate ships schemas for the built-in kinds only: for PodMonitor and
PrometheusRule (Prometheus Operator CRDs) it prints "Couldn't find schema" and validates
nothing. Those are checked here instead, against a strict subset of their CRD's
openAPIV3Schema (the fields these files use, unknown fields rejected, with metadata and
selectors checked against Kubernetes' own definitions from kubernetes-validate), and the
PrometheusRule's groups against the promtool-checked rules file.
"""

from __future__ import annotations

import functools
import json
import posixpath
import re
import shutil
import subprocess
import sys
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
PERFORMANCE = ROOT / "docs" / "performance.md"
OVERLAYS = ("single", "once", "shards", "fleet")
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
UID = 10001
CONFIG_PATH = "/etc/keepwarm/keepwarm.yaml"
WORKLOADS = {"single": "Deployment", "once": "CronJob", "shards": "StatefulSet", "fleet": "Deployment"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl not found: it builds the kustomize overlays (`kubectl kustomize`); see scripts/test"
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` renders."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], check=False, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def built(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def one(overlay: str, kind: str, objects: tuple[dict[str, Any], ...] | list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [o for o in (built(overlay) if objects is None else objects) if o["kind"] == kind]
    assert len(found) == 1, f"{overlay}: {len(found)} {kind}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    template = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
    spec: dict[str, Any] = template["template"]["spec"]
    return spec


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    template = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
    labels: dict[str, str] = template["template"]["metadata"]["labels"]
    return labels


# --- building and validating --------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    objects = built(overlay)
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(out)],
                            check=False, capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # --quiet prints only problems: a missing schema shows as a WARN, allowed for the CRDs only.
    for line in filter(None, output.splitlines()):
        assert any(f"kind {kind} " in line for kind in CRD_KINDS) and "Couldn't find schema" in line, line
    kinds = {o["kind"] for o in objects}
    assert [o["kind"] for o in objects].count(WORKLOADS[overlay]) == 1
    assert not (set(WORKLOADS.values()) - {WORKLOADS[overlay]}) & kinds
    # The example Secret is never applied: a placeholder must not overwrite the real key.
    assert "Secret" not in kinds
    # The settings are kustomize's only (local-config): never applied.
    assert "keepwarm-settings" not in {o["metadata"]["name"] for o in objects}
    # Everything in the overlay's namespace.
    assert {o["metadata"].get("namespace") for o in objects} == {"keepwarm"}


def test_strict_validation_catches_a_stray_field(tmp_path: Path) -> None:
    deployment = dict(one("single", "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(bad)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "'replica' was unexpected" in result.stdout + result.stderr


def checkov() -> str:
    for candidate in (ROOT / ".venv-checkov" / "bin" / "checkov", Path(sys.executable).parent / "checkov"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("checkov")
    assert found, "checkov not found: scripts/test installs it in .venv-checkov (it pins its own dependencies)"
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_but_the_explained_exception(overlay: str, tmp_path: Path) -> None:
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(yaml.safe_dump_all(built(overlay), sort_keys=False))
    result = subprocess.run([checkov(), "-f", str(out), "--framework", "kubernetes", "--quiet", "-o", "json"],
                            check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"].get("failed_checks", [])]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["passed"] >= 50 and summary["parsing_errors"] == 0, summary
    # The one exception, CKV_K8S_43 (image by digest), explained on the workload itself.
    skips = {k: v for k, v in one(overlay, WORKLOADS[overlay])["metadata"].get("annotations", {}).items()
             if k.startswith("checkov.io/skip")}
    assert list(skips.values()) == [
        "CKV_K8S_43=the digest is set by the installer with kustomize edit set image"], skips
    assert summary["skipped"] == 1


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
POD_MONITOR = crd_object("monitoring.coreos.com/v1", "PodMonitor", {
    "type": "object",
    "required": ["selector"],
    "additionalProperties": False,
    "properties": {
        "selector": {"$ref": DEFS + "LabelSelector"},
        "jobLabel": {"type": "string"},
        "namespaceSelector": {
            "type": "object", "additionalProperties": False,
            "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
        },
        "podMetricsEndpoints": {
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
SCHEMAS = {"PodMonitor": POD_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def validate_crd(document: dict[str, Any], schema: dict[str, Any]) -> None:
    version = kv.latest_version()
    definitions = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry: referencing.Registry[Any] = referencing.Registry().with_resources([
        (definitions["$id"], referencing.Resource.from_contents(definitions)),
    ])
    jsonschema.Draft202012Validator(schema, registry=registry).validate(document)


@pytest.mark.parametrize("overlay", ("single", "shards", "fleet"))
@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_crd_against_its_schema_subset(overlay: str, kind: str) -> None:
    validate_crd(one(overlay, kind), SCHEMAS[kind])


def test_crd_subset_schema_rejects_what_the_crd_rejects() -> None:
    # Guards the check above: a misspelt field and a bad duration must not pass.
    monitor = json.loads(json.dumps(one("single", "PodMonitor")))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(monitor, POD_MONITOR)
    rule = json.loads(json.dumps(one("single", "PrometheusRule")))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(rule, PROMETHEUS_RULE)


def test_the_once_overlay_has_nothing_to_scrape() -> None:
    kinds = {o["kind"] for o in built("once")}
    assert not kinds & (CRD_KINDS | {"Service", "PodDisruptionBudget", "PersistentVolumeClaim"}), kinds


# --- the rules and the settings ------------------------------------------------------------------

def rules_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def test_prometheusrule_source_carries_exactly_the_rules_file_groups() -> None:
    source = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert source["spec"]["groups"] == rules_groups()


def test_built_rules_are_the_rules_file_with_the_default_settings() -> None:
    assert one("single", "PrometheusRule")["spec"]["groups"] == rules_groups()


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    return tree


def test_settings_rename_the_job_and_move_the_runbook_everywhere(tmp_path: Path) -> None:
    # The settings are edited in base/settings.yaml (a patch in an overlay on top would come
    # after the replacements that read them: docs/deploy.md says so).
    tree = copy_tree(tmp_path)
    settings = tree / "base" / "settings.yaml"
    text = settings.read_text()
    text = text.replace("  job: keepwarm\n", "  job: kw-team-a\n")
    text = re.sub(r"  runbook_base: .*\n", "  runbook_base: https://wiki.example.org/keepwarm/runbook\n", text)
    assert "kw-team-a" in text and "wiki.example.org" in text
    settings.write_text(text)
    overlay = tree / "overlays" / "shards"
    objects = kustomize(overlay)
    rules = [r for g in one("shards", "PrometheusRule", objects)["spec"]["groups"] for r in g["rules"]]
    alerts = [r for r in rules if "alert" in r]
    assert all(r["annotations"]["runbook_url"] == f"https://wiki.example.org/keepwarm/runbook#{r['alert'].lower()}"
               for r in alerts)
    text = yaml.safe_dump(rules)
    assert 'job="keepwarm"' not in text and "github.com" not in text
    named = {r.get("alert") or r["record"] for r in rules if 'job="kw-team-a"' in str(r["expr"])}
    assert named == {"KeepwarmDown", "KeepwarmTargetMissing"}
    (expected,) = [r for r in rules if r.get("record") == "job:keepwarm_expected_targets:count"]
    assert expected["labels"] == {"job": "kw-team-a"}
    # The PodMonitor names the job after the pods' part-of label, which the settings set.
    monitor = one("shards", "PodMonitor", objects)["spec"]
    assert pod_labels(one("shards", "StatefulSet", objects))[monitor["jobLabel"]] == "kw-team-a"
    # What was rewritten still passes promtool's check.
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": one("shards", "PrometheusRule", objects)["spec"]["groups"]}))
    check = subprocess.run([promtool(), "check", "rules", "--lint-fatal", str(rules_file)],
                           check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: scripts/test installs it (Debian package prometheus)"
    return path


def test_shards_replicas_set_the_shard_count_and_the_expected_targets(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    statefulset = tree / "overlays" / "shards" / "statefulset.yaml"
    statefulset.write_text(re.sub(r"^  replicas: 3$", "  replicas: 5", statefulset.read_text(), count=1, flags=re.M))
    objects = kustomize(tree / "overlays" / "shards")
    sts = one("shards", "StatefulSet", objects)
    assert sts["spec"]["replicas"] == 5
    env = {e["name"]: e for e in pod_spec(sts)["containers"][0]["env"]}
    assert env["SHARDS"]["value"] == "5"
    groups = one("shards", "PrometheusRule", objects)["spec"]["groups"]
    (expected,) = [r for g in groups for r in g["rules"] if r.get("record") == "job:keepwarm_expected_targets:count"]
    assert str(expected["expr"]) == "5"

    # On promtool, with these rules: 4 of the 5 shards scraped is a missing target; 5 is quiet.
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    series = [{"series": f'up{{namespace="keepwarm",job="keepwarm",instance="keepwarm-{k}:9464"}}', "values": "1x20"}
              for k in range(5)]
    (missing,) = [r for g in groups for r in g["rules"] if r.get("alert") == "KeepwarmTargetMissing"]
    annotations = {k: v.replace("{{ $value }}", "4").replace("{{ $labels.job }}", "keepwarm")
                   for k, v in missing["annotations"].items()}
    fired = {"alertname": "KeepwarmTargetMissing", "eval_time": "10m", "exp_alerts": [{
        "exp_labels": {"severity": "critical", "namespace": "keepwarm", "job": "keepwarm"},
        "exp_annotations": annotations}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series[:4], "alert_rule_test": [fired]},
                  {"interval": "1m", "input_series": series, "alert_rule_test": [{**fired, "exp_alerts": []}]}],
    }))
    result = subprocess.run([promtool(), "test", "rules", "test.yml"], check=False, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the pods ------------------------------------------------------------------------------------

def secret_files(volume: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The files a volume makes from Secrets: file name -> (Secret, key); {} for any other volume."""
    if "secret" in volume:
        secret = volume["secret"]
        items = secret.get("items") or [{"key": "anthropic_api_key", "path": "anthropic_api_key"}]
        return {i["path"]: (secret["secretName"], i["key"]) for i in items}
    sources = volume.get("projected", {}).get("sources", [])
    return {i["path"]: (s["secret"]["name"], i["key"]) for s in sources if "secret" in s for i in s["secret"]["items"]}


def check_hardened(overlay: str) -> None:
    spec = pod_spec(one(overlay, WORKLOADS[overlay]))
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_read_only_as_the_image_user(overlay: str) -> None:
    check_hardened(overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_key_config_prompts_and_state_are_mounted(overlay: str) -> None:
    workload = one(overlay, WORKLOADS[overlay])
    spec = pod_spec(workload)
    (container,) = spec["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any("subPath" in m or "subPathExpr" in m for m in mounts.values()), "subPath never updates"
    env = {e["name"]: e for e in container.get("env", [])}
    # The key: a Secret mounted as a directory, named by CREDENTIALS_DIRECTORY; not an env var.
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in env.values())
    assert "ANTHROPIC_API_KEY" not in env
    (secret_mount,) = [m for m in mounts.values() if secret_files(volumes.get(m["name"], {}))]
    assert env["CREDENTIALS_DIRECTORY"]["value"] == secret_mount["mountPath"] and secret_mount["readOnly"] is True
    examples = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())}
    files = secret_files(volumes[secret_mount["name"]])
    assert files["anthropic_api_key"] == ("keepwarm-anthropic", "anthropic_api_key")
    assert "anthropic_api_key" in examples["keepwarm-anthropic"]["stringData"]
    if overlay != "once":
        # A daemon listens for observations: the token is the file load_token finds in
        # $CREDENTIALS_DIRECTORY, from a Secret the example shows.
        from keepwarm.observations import TOKEN_CREDENTIAL

        secret, key = files[TOKEN_CREDENTIAL]
        assert key in examples[secret]["stringData"]
    # The config and every expert's prompt ConfigMap, projected into the config's directory.
    (config_mount,) = [m for m in mounts.values() if "configMap" in volumes.get(m["name"], {}).get("projected", {})
                       .get("sources", [{}])[0]]
    assert config_mount["mountPath"] == posixpath.dirname(CONFIG_PATH) and config_mount["readOnly"] is True
    sources = [s["configMap"] for s in volumes[config_mount["name"]]["projected"]["sources"]]
    config_maps = {o["metadata"]["name"]: o for o in built(overlay) if o["kind"] == "ConfigMap"}
    assert {s["name"] for s in sources} == set(config_maps), "every generated ConfigMap, and only those"
    assert len(sources) >= 3, "the config and one ConfigMap per expert"
    if overlay == "fleet":
        # No state on the pod (it is in the database): no claim, no STATE_DIRECTORY; the
        # database's password is the file keepwarm reads from $CREDENTIALS_DIRECTORY.
        assert "STATE_DIRECTORY" not in env and "volumeClaimTemplates" not in workload["spec"]
        assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]
        assert not [o for o in built(overlay) if o["kind"] == "PersistentVolumeClaim"]
        assert files == {"anthropic_api_key": ("keepwarm-anthropic", "anthropic_api_key"),
                         "ledger_password": ("keepwarm-ledger", "password"),
                         "observe_token": ("keepwarm-observe", "token")}
        return
    assert list(files) == (["anthropic_api_key"] if overlay == "once" else ["anthropic_api_key", "observe_token"])
    # The state: STATE_DIRECTORY is a writable mount.
    state = env["STATE_DIRECTORY"]["value"]
    (state_mount,) = [m for m in mounts.values() if m["mountPath"] == state]
    assert not state_mount.get("readOnly")
    if overlay == "single":
        claim = volumes[state_mount["name"]]["persistentVolumeClaim"]["claimName"]
        pvc = one(overlay, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert state == "/var/lib/keepwarm"
    elif overlay == "shards":
        templates = {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
        assert state_mount["name"] in templates and state_mount["name"] not in volumes
        assert state == "/var/lib/keepwarm"
    else:
        # `once`: no volume for state, each run starts without it; the scratch emptyDir.
        assert "emptyDir" in volumes[state_mount["name"]]
        assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_projected_config_is_accepted_by_the_daemon(overlay: str, tmp_path: Path) -> None:
    # Lay the projected volume out as the kubelet does and load it with the daemon's own
    # strict loader: an unknown key or a prompt the config names but no ConfigMap holds would
    # be a ConfigError.
    from keepwarm.config import load_config

    spec = pod_spec(one(overlay, WORKLOADS[overlay]))
    (volume,) = [v for v in spec["volumes"] if "projected" in v and not secret_files(v)]
    config_maps = {o["metadata"]["name"]: o for o in built(overlay) if o["kind"] == "ConfigMap"}
    for source in volume["projected"]["sources"]:
        data = config_maps[source["configMap"]["name"]]["data"]
        items = source["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = tmp_path / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]])
    config = load_config(tmp_path / posixpath.basename(CONFIG_PATH))
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9464)
    assert len(config.pairs) >= 2


def performance_peak_mb() -> float:
    """The highest RSS peak docs/performance.md measured for the daemon at 10,000 pairs."""
    text = PERFORMANCE.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 10,000 ") or line.startswith("| 15a016a")
            or line.startswith("| e5868e8") or line.startswith("| 9e9f2cd") or line.startswith("| cd681b2")]
    peaks = [float(m) for row in rows for m in re.findall(r"\*\*(\d+\.\d) MB\*\*", row)]
    assert len(peaks) >= 3, rows
    return max(peaks)


def quantity_mb(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"Mi": 2**20, "Gi": 2**30}[unit] / 1e6


@pytest.mark.parametrize("overlay", ("single", "shards", "fleet"))
def test_daemons_are_sized_from_the_measured_figures(overlay: str) -> None:
    (container,) = pod_spec(one(overlay, WORKLOADS[overlay]))["containers"]
    resources = container["resources"]
    peak = performance_peak_mb()
    # The request covers the measured peak at 10,000 pairs; the limit leaves room for a reload.
    assert quantity_mb(resources["requests"]["memory"]) >= peak
    assert quantity_mb(resources["limits"]["memory"]) >= 1.5 * peak
    cpu = resources["requests"]["cpu"]
    assert cpu.endswith("m") and int(cpu[:-1]) >= 300  # 0.19 to 0.35 of a core measured
    assert {"cpu", "memory"} <= set(resources["limits"])


@pytest.mark.parametrize("overlay", ("single", "shards", "fleet"))
def test_probes_liveness_is_the_heartbeat_and_readiness_the_schedule(overlay: str) -> None:
    (container,) = pod_spec(one(overlay, WORKLOADS[overlay]))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9464}
    paths = {probe: container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert all(ports.get(container[p]["httpGet"]["port"]) == 9464 for p in paths)
    assert container["args"][:3] == ["run", "--config", CONFIG_PATH]


def test_single_is_one_daemon_recreated_on_its_claim() -> None:
    deployment = one("single", "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # A ReadWriteOnce claim and one pinger: the old pod stops before the new one starts.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()


def test_shards_roll_one_at_a_time_spread_over_nodes() -> None:
    sts = one("shards", "StatefulSet")
    spec = sts["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    env = {e["name"]: e for e in pod_spec(sts)["containers"][0]["env"]}
    assert int(env["SHARDS"]["value"]) == spec["replicas"]
    spread = pod_spec(sts)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= pod_labels(sts).items() for c in spread)


@pytest.mark.parametrize("overlay", ("single", "shards", "fleet"))
def test_disruption_budget_and_monitor_select_the_daemon(overlay: str) -> None:
    labels = pod_labels(one(overlay, WORKLOADS[overlay]))
    pdb = one(overlay, "PodDisruptionBudget")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": pdb["selector"]}
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    monitor = one(overlay, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert [(e["port"], e["path"]) for e in monitor["podMetricsEndpoints"]] == [("metrics", "/metrics")]
    assert labels[monitor["jobLabel"]] == "keepwarm"
    assert 'up{job="keepwarm"}' in RULES.read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_scrapes_and_observations_in_and_the_api_out(overlay: str) -> None:
    policy = one(overlay, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(one(overlay, WORKLOADS[overlay])).items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [9464]
    out = sorted((p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"])
    # A fleet also reaches its PostgreSQL.
    assert out == sorted([(53, "TCP"), (53, "UDP"), (443, "TCP")] + [(5432, "TCP")] * (overlay == "fleet"))


def test_cronjob() -> None:
    cronjob = one("once", "CronJob")["spec"]
    assert cronjob["schedule"] == "*/4 * * * *"
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert 0 < cronjob["startingDeadlineSeconds"] < 240
    spec = pod_spec(one("once", "CronJob"))
    (container,) = spec["containers"]
    assert container["args"] == ["once", "--config", CONFIG_PATH]
    assert spec["restartPolicy"] == "Never"
    (daemon,) = pod_spec(one("single", "Deployment"))["containers"]
    assert container["securityContext"] == daemon["securityContext"]
    assert container["image"] == daemon["image"]


def test_uid_matches_the_image() -> None:
    user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user and int(user.group(1)) == UID


def test_fleet_rolls_with_a_surge_spread_over_nodes_on_its_database() -> None:
    deployment = one("fleet", "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    # Members may overlap: a new one is ready before an old one leaves, never fewer than replicas.
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= pod_labels(deployment).items() for c in spread)
    # KeepwarmTargetMissing expects the replicas.
    rule = one("fleet", "PrometheusRule")
    (expected,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record") == "job:keepwarm_expected_targets:count"]
    assert expected["expr"] == str(spec["replicas"])
    # The config: the base's, plus the database and the fleet (no password in the URL).
    config_maps = [o for o in built("fleet") if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("keepwarm-config")]
    (config_map,) = config_maps
    fleet = yaml.safe_load(config_map["data"]["keepwarm.yaml"])
    base = yaml.safe_load((K8S / "base" / "keepwarm.yaml").read_text())
    assert {k: v for k, v in fleet.items() if k not in ("ledger", "fleet")} == base
    assert fleet["ledger"]["url"].startswith("postgresql://") and ":5432/" in fleet["ledger"]["url"]
    assert "password" not in fleet["ledger"]["url"] and "@" in fleet["ledger"]["url"]
    assert fleet["fleet"]["name"]
