"""deploy/k8s: schema validation (kubernetes-validate, offline), structure of the custom
resources, consistency between the manifests and the settings they configure, no shipped
secret, and a NetworkPolicy that admits only the scraper and the brokers."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stream_classifier.config import ENV_PREFIX, load_settings
from tests.fixtures.deploy import setting_env_names

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
CPU_OVERLAY = K8S / "overlays" / "cpu"
# The oldest Kubernetes minor the manifests promise to work on.
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
KUBECTL = shutil.which("kubectl")

Manifest = dict[str, Any]


def load_all(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_manifests() -> list[Manifest]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_all(BASE / name)]


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def validate_builtin(manifests: list[Manifest]) -> None:
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def kustomize(path: Path) -> list[Manifest]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with built-in kustomize) not installed")


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    return base_manifests()


@pytest.fixture(scope="module")
def settings_env(manifests: list[Manifest]) -> dict[str, str]:
    return dict(find(manifests, "ConfigMap", "stream-classifier-settings")["data"])


def container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Manifest = containers[0]
    return result


def test_kustomization_lists_every_manifest_file() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (BASE / file).is_file()
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]


def test_builtin_manifests_validate_against_the_kubernetes_schemas(manifests: list[Manifest]) -> None:
    validate_builtin(manifests)
    kinds = {m["kind"] for m in manifests}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "Job",
        "ServiceMonitor",
        "ScaledObject",
        "NetworkPolicy",
    } <= kinds


def test_schema_validation_rejects_a_broken_manifest(manifests: list[Manifest]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(find(manifests, "Deployment", "stream-classifier")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def env_of(manifests: list[Manifest]) -> dict[str, str]:
    """Every STREAM_CLASSIFIER_* variable the manifests set (ConfigMap, Secret, container env)."""
    env: dict[str, str] = {}
    for manifest in manifests:
        if manifest["kind"] in ("ConfigMap", "Secret"):
            data = manifest.get("data") or manifest.get("stringData") or {}
            env.update({k: v for k, v in data.items() if k.startswith(ENV_PREFIX)})
        if manifest["kind"] in ("Deployment", "Job"):
            for c in manifest["spec"]["template"]["spec"]["containers"]:
                env.update(
                    {e["name"]: e["value"] for e in c.get("env", []) if e["name"].startswith(ENV_PREFIX)}
                )
    return env


def test_every_setting_variable_is_a_real_setting(
    manifests: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(manifests)
    assert set(env) <= setting_env_names(), set(env) - setting_env_names()
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.retrain.enabled is True


SECRET_NAME = "stream-classifier-kafka"


def test_no_secret_is_shipped_only_referenced(manifests: list[Manifest]) -> None:
    # A shipped Secret is a guessable default, and applying it overwrites the user's own.
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "Secret"] == []
    secret_like = [key for key in env_of(manifests) if re.search(r"PASSWORD|TOKEN|SECRET|SASL_USERNAME", key)]
    assert secret_like == []
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "Job"):
            for c in manifest["spec"]["template"]["spec"]["containers"]:
                assert {"secretRef": {"name": SECRET_NAME, "optional": True}} in c["envFrom"]
    kustomization = (BASE / "kustomization.yaml").read_text()
    assert f"create secret generic {SECRET_NAME}" in kustomization  # how to create it


def pods(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    """The pod template labels of every workload."""
    return {
        m["metadata"]["name"]: m["spec"]["template"]["metadata"]["labels"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
    }


def test_network_policy_admits_only_the_scraper_and_the_brokers(
    manifests: list[Manifest], settings_env: dict[str, str]
) -> None:
    spec = find(manifests, "NetworkPolicy")["spec"]
    selector = spec["podSelector"]["matchLabels"]
    assert selector and all(selector.items() <= labels.items() for labels in pods(manifests).values())
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]  # both default-deny

    [ingress] = spec["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    [scraper] = ingress["from"]
    # One peer holding both selectors (AND); two peers would admit the whole namespace (OR).
    assert set(scraper) == {"namespaceSelector", "podSelector"}
    assert scraper["namespaceSelector"]["matchLabels"] and scraper["podSelector"]["matchLabels"]
    monitor = find(manifests, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    host, port = settings_env["STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS"].split(",")[0].rsplit(":", 1)
    broker_namespace = host.split(".")[1]  # <service>.<namespace>.svc
    brokers, dns = spec["egress"]
    assert brokers == {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": broker_namespace}}}],
        "ports": [{"protocol": "TCP", "port": int(port)}],
    }
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    [resolver] = dns["to"]
    assert resolver["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert resolver["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_deployments_probes_security_and_resources(
    manifests: list[Manifest], settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, value in settings_env.items():
        monkeypatch.setenv(variable, value)
    shutdown_s = load_settings().processing.shutdown_timeout_s
    port = int(settings_env["STREAM_CLASSIFIER_METRICS__PORT"])
    for name in ("stream-classifier", "stream-classifier-trainer"):
        deployment = find(manifests, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert c["args"] == ["serve"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": port}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loads can be slow"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert "memory" in c["resources"]["limits"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for writable in ("/tmp", "/cache"):
            assert "emptyDir" in volumes[mounts[writable]], f"{writable} must be writable"
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "stream-classifier-models"
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + shutdown_s


def test_trainer_is_a_single_writer_of_a_read_write_many_store(manifests: list[Manifest]) -> None:
    trainer = find(manifests, "Deployment", "stream-classifier-trainer")
    serving = find(manifests, "Deployment", "stream-classifier")
    assert trainer["spec"]["replicas"] == 1
    assert trainer["spec"]["strategy"]["type"] == "Recreate"
    assert {"name": "STREAM_CLASSIFIER_RETRAIN__ENABLED", "value": "true"} in container(trainer)["env"]
    assert "env" not in container(serving) or all(
        e["name"] != "STREAM_CLASSIFIER_RETRAIN__ENABLED" for e in container(serving)["env"]
    )
    models_mount = {m["name"]: m for m in container(serving)["volumeMounts"]}["models"]
    assert models_mount.get("readOnly") is True
    assert {m["name"]: m for m in container(trainer)["volumeMounts"]}["models"].get("readOnly") is not True
    pvc = find(manifests, "PersistentVolumeClaim", "stream-classifier-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_service_servicemonitor_and_pdb_select_the_pods(manifests: list[Manifest]) -> None:
    serving = find(manifests, "Deployment", "stream-classifier")
    pod_labels = serving["spec"]["template"]["metadata"]["labels"]
    service = find(manifests, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"

    monitor = find(manifests, "ServiceMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
        assert endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"

    pdb = find(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_scaled_object_scales_serving_on_lag_within_the_partitions(
    manifests: list[Manifest], settings_env: dict[str, str]
) -> None:
    scaled = find(manifests, "ScaledObject")
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
    assert (
        spec["scaleTargetRef"]["name"]
        == find(manifests, "Deployment", "stream-classifier")["metadata"]["name"]
    )
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= set(meta)
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServers"] == settings_env["STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == settings_env["STREAM_CLASSIFIER_KAFKA__GROUP_ID"]
    assert meta["topic"] in settings_env["STREAM_CLASSIFIER_KAFKA__INPUT_TOPICS"].split(",")

    job = find(manifests, "Job")
    job_env = {e["name"]: e["value"] for e in container(job)["env"]}
    partitions = int(job_env["TOPIC_PARTITIONS"])
    trainers = find(manifests, "Deployment", "stream-classifier-trainer")["spec"]["replicas"]
    assert spec["maxReplicaCount"] + trainers <= partitions, "a consumer beyond the partitions sits idle"


def test_topic_job_runs_the_generated_script(manifests: list[Manifest]) -> None:
    job = find(manifests, "Job")
    c = container(job)
    assert c["image"].startswith("apache/kafka:")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert c["command"] == ["/bin/bash", f"{mounts['scripts']}/create-topics.sh"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    assert volumes["scripts"]["configMap"]["name"] in generated
    assert {"configMapRef": {"name": "stream-classifier-settings"}} in c["envFrom"]


def fake_kafka_home(tmp_path: Path) -> tuple[Path, Path]:
    """A KAFKA_HOME whose kafka-topics.sh records its arguments (and any client config)."""
    log = tmp_path / "calls.log"
    script = tmp_path / "bin" / "kafka-topics.sh"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {log}\n'
        'while [ $# -gt 0 ]; do [ "$1" = --command-config ] && cat "$2" >> ' + str(log) + "; shift; done\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return tmp_path, log


def run_create_topics(env: dict[str, str], tmp_path: Path) -> list[str]:
    home, log = fake_kafka_home(tmp_path)
    result = subprocess.run(
        ["bash", str(BASE / "create-topics.sh")],
        env={"PATH": os.environ["PATH"], "KAFKA_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def test_create_topics_sets_partitions_retention_and_compaction(
    manifests: list[Manifest], settings_env: dict[str, str], tmp_path: Path
) -> None:
    job_env = {e["name"]: e["value"] for e in container(find(manifests, "Job"))["env"]}
    calls = [c for c in run_create_topics({**settings_env, **job_env}, tmp_path) if "--create" in c]
    by_topic = {c.split("--topic ")[1].split()[0]: c for c in calls}
    assert set(by_topic) == {
        "texts",
        "predictions",
        "dead-letters",
        "feedback",
        "review",
        "stream-classifier-model-updates",
    }
    assert "--partitions 12 --replication-factor 3" in by_topic["texts"]
    assert "--config retention.ms=-1" in by_topic["feedback"]
    assert "--partitions 1 " in by_topic["stream-classifier-model-updates"]
    assert "--config cleanup.policy=compact" in by_topic["stream-classifier-model-updates"]
    assert all("--if-not-exists" in c for c in calls)


def test_create_topics_speaks_sasl(tmp_path: Path) -> None:
    lines = run_create_topics(
        {
            "STREAM_CLASSIFIER_KAFKA__INPUT_TOPICS": '["a", "b"]',
            "STREAM_CLASSIFIER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "STREAM_CLASSIFIER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAM_CLASSIFIER_KAFKA__SASL_USERNAME": "svc",
            "STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD": "pw",
        },
        tmp_path,
    )
    assert "security.protocol=SASL_SSL" in lines
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    assert f'sasl.jaas.config={scram} required username="svc" password="pw";' in lines
    assert sum("--topic a " in line for line in lines) == 1
    assert sum("--topic b " in line for line in lines) == 1


@needs_kubectl
def test_gpu_build_validates() -> None:
    rendered = kustomize(K8S)
    validate_builtin(rendered)
    assert all(
        m["metadata"].get("namespace") == "stream-classifier" for m in rendered if m["kind"] != "Namespace"
    )
    serving = find(rendered, "Deployment", "stream-classifier")
    assert container(serving)["image"].endswith(":0.1.0")


@needs_kubectl
def test_cpu_overlay_drops_the_gpu_and_matches_torch_threads_to_the_cpu_request() -> None:
    rendered = kustomize(CPU_OVERLAY)
    validate_builtin(rendered)
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(rendered)
    for name in ("stream-classifier", "stream-classifier-trainer"):
        deployment = find(rendered, "Deployment", name)
        assert "tolerations" not in deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert c["image"].endswith(":0.1.0-cpu")
        # torch's threads = the CPU request (not the node's cores); the base env is kept.
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        assert env["OMP_NUM_THREADS"] == c["resources"]["requests"]["cpu"]
        if name == "stream-classifier-trainer":
            assert env["STREAM_CLASSIFIER_RETRAIN__ENABLED"] == "true"
