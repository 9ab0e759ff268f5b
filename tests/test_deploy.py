"""The deployment examples under deploy/ agree with the product: every embedded configuration
loads as the proxy would load it in the container (the image's environment, the manifest's
environment and arguments), and the ports, probes, grace periods and config mounts match it.

Every sentinel-proxy container of every file under deploy/kubernetes/ is checked, so a new
example is held to the same rules by being there."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sentinel_proxy.cli import build_parser, resolve_config
from sentinel_proxy.config import Config
from tests.support.ports import free_port
from tests.support.proxy_process import REPO_ROOT, StartProxy

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
IMAGE = "sentinel-proxy"
# Values for environment variables a manifest takes from a Secret it does not define.
SECRET_STAND_INS = {"OPENAI_API_KEY": "sk-stand-in"}
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "Job"}
_PROBE_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)")


def image_env() -> dict[str, str]:
    """The ENV instructions of the Dockerfile, which the container starts with."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def image_uid() -> int:
    found = re.search(r"useradd .*--uid (\d+)", (REPO_ROOT / "Dockerfile").read_text())
    assert found is not None
    return int(found.group(1))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


def proxy_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if container["image"].split(":")[0].rsplit("/", 1)[-1] == IMAGE:
            yield container


def secret_value(docs: list[dict[str, Any]], name: str, ref: dict[str, Any]) -> str:
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
    if secrets:
        value: str = secrets[0]["stringData"][ref["key"]]
        return value
    return SECRET_STAND_INS[name]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    env = image_env()
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = secret_value(docs, item["name"], item["valueFrom"]["secretKeyRef"])
    return env


def mounted_config(
    docs: list[dict[str, Any]], spec: dict[str, Any], container: dict[str, Any], path: str
) -> str:
    """The text of the ConfigMap file mounted at `path` in `container`."""
    file = PurePosixPath(path)
    [mount] = [m for m in container["volumeMounts"] if file.parent == PurePosixPath(m["mountPath"])]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = named(docs, "ConfigMap", volume["configMap"]["name"])
    text: str = config_map["data"][file.name]
    return text


def load(container: dict[str, Any], env: dict[str, str], text: str, tmp_path: Path) -> Config:
    """The configuration the proxy in `container` starts with, loaded as it loads it."""
    assert "command" not in container, "the image's ENTRYPOINT is sentinel-proxy"
    local = tmp_path / "sentinel.toml"
    local.write_text(text)
    args = build_parser().parse_args(container.get("args", []))
    assert args.command is None
    return resolve_config(args, {**env, "SENTINEL_CONFIG": str(local)})


def probe_target(probe: dict[str, Any], container: dict[str, Any]) -> tuple[int, str]:
    """The port and path a probe asks."""
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            [port] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
        return port, probe["httpGet"]["path"]
    found = _PROBE_URL.search(" ".join(probe["exec"]["command"]))
    assert found is not None, probe
    return int(found.group(1)), found.group(2)


def pre_stop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def checked_proxies(path: Path, tmp_path: Path) -> list[tuple[dict[str, Any], Config]]:
    """Each proxy container of the file with its configuration, after the checks that every
    one of them must pass."""
    docs = documents(path)
    checked = []
    for doc in docs:
        if doc["kind"] not in POD_KINDS:
            continue
        spec = pod_spec(doc)
        for container in proxy_containers(doc):
            env = container_env(docs, container)
            text = mounted_config(docs, spec, container, env["SENTINEL_CONFIG"])
            config = load(container, env, text, tmp_path)
            port = config.server.port
            where = f"{path.name}: {container['name']}"

            assert port in [p["containerPort"] for p in container["ports"]], where
            probes = {
                kind: probe_target(container[f"{kind}Probe"], container)
                for kind in ("liveness", "readiness", "startup")
                if f"{kind}Probe" in container
            }
            assert probes["liveness"] == (port, "/healthz"), where
            assert probes["readiness"] == (port, "/readyz"), where
            assert probes.get("startup", (port, "/readyz")) == (port, "/readyz"), where
            if any("httpGet" in container.get(f"{k}Probe", {}) for k in probes):
                assert config.server.host == "0.0.0.0", f"{where}: the kubelet cannot reach it"
            grace = spec["terminationGracePeriodSeconds"]
            needed = config.server.shutdown_grace_seconds + pre_stop_seconds(container)
            assert grace > needed, f"{where}: the kubelet would kill open streams"
            security = container.get("securityContext", {})
            if security.get("runAsNonRoot"):
                # The image's USER is a name, which the kubelet cannot check for non-root.
                assert security["runAsUser"] == image_uid(), where
            checked.append((container, config))
    return checked


@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_every_kubernetes_example_agrees_with_the_product(path: Path, tmp_path: Path) -> None:
    assert checked_proxies(path, tmp_path), f"{path.name} runs no {IMAGE} container"


def test_the_examples_are_there() -> None:
    assert {p.name for p in KUBERNETES} >= {"sidecar.yaml", "gateway.yaml"}


def test_sidecar_is_on_loopback_and_its_app_uses_it(tmp_path: Path) -> None:
    path = DEPLOY / "kubernetes" / "sidecar.yaml"
    [(container, config)] = checked_proxies(path, tmp_path)
    [deployment] = [d for d in documents(path) if d["kind"] == "Deployment"]
    spec = pod_spec(deployment)

    assert config.server.host == "127.0.0.1"
    # A native sidecar: started before the app, stopped after it.
    assert container in spec["initContainers"] and container["restartPolicy"] == "Always"
    assert "startupProbe" in container
    [app] = spec["containers"]
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    assert app_env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{config.server.port}/v1"
    assert config.providers[0].api_key is not None, "the proxy, not the app, holds the key"


def test_gateway_is_replicas_over_one_redis_behind_a_service(tmp_path: Path) -> None:
    path = DEPLOY / "kubernetes" / "gateway.yaml"
    docs = documents(path)
    [(container, config)] = checked_proxies(path, tmp_path)
    deployment = named(docs, "Deployment", "sentinel-gateway")
    service = named(docs, "Service", "sentinel-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert deployment["spec"]["replicas"] == 3
    assert service["spec"]["selector"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert probe_target({"httpGet": {"port": port["targetPort"], "path": "/"}}, container) == (
        config.server.port,
        "/",
    )
    [redis_env] = [e for e in container["env"] if e["name"] == "SENTINEL_REDIS_URL"]
    assert "secretKeyRef" in redis_env["valueFrom"]
    assert config.session.redis_url is not None
    # The Secret's URL names the Redis Service of the same file, on its port.
    url = config.session.redis_url.reveal()
    redis = named(docs, "Service", "sentinel-redis")
    assert url == f"redis://sentinel-redis:{redis['spec']['ports'][0]['port']}/0"
    assert config.server.workers == 1


def test_compose_runs_the_repositorys_image_with_redis(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    proxy = compose["services"]["sentinel-proxy"]
    build = DEPLOY / proxy["build"]["context"]
    assert (build / proxy["build"]["dockerfile"]).resolve() == REPO_ROOT / "Dockerfile"

    env = {**image_env(), **proxy["environment"], "OPENAI_API_KEY": "sk-stand-in"}
    [volume] = proxy["volumes"]
    source, target, mode = volume.split(":")
    assert mode == "ro" and target == env["SENTINEL_CONFIG"]
    container = {"args": proxy.get("command", [])}
    config = load(container, env, (DEPLOY / source).read_text(), tmp_path)

    [mapping] = proxy["ports"]
    assert int(mapping.rsplit(":", 1)[1]) == config.server.port
    assert config.server.host == "0.0.0.0"
    assert config.session.redis_url is not None
    assert config.session.redis_url.reveal().startswith("redis://redis:6379/")
    assert "redis" in compose["services"]
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = float(proxy["stop_grace_period"].removesuffix("s"))
    assert grace > config.server.shutdown_grace_seconds


def test_the_sidecars_exec_probes_answer_as_the_kubelet_reads_them(
    start_proxy: StartProxy,
) -> None:
    path = DEPLOY / "kubernetes" / "sidecar.yaml"
    [deployment] = [d for d in documents(path) if d["kind"] == "Deployment"]
    [container] = proxy_containers(deployment)
    proxy = start_proxy(None, extra_args=("--demo",))

    for kind in ("startup", "liveness", "readiness"):
        command = container[f"{kind}Probe"]["exec"]["command"]
        assert command[0] == "python"
        # Exit status 0 is success, as the kubelet reads it.
        for port, status in ((proxy.port, 0), (free_port(), 1)):
            script = command[-1].replace(":8080/", f":{port}/")
            result = subprocess.run(
                [sys.executable, *command[1:-1], script], capture_output=True, timeout=20
            )
            assert result.returncode == status, (kind, port, result.stderr)
