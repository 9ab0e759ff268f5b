"""deploy/kubernetes/gateway-cluster.yaml: replicas scaled by a HorizontalPodAutoscaler on CPU,
a PodDisruptionBudget, sessions in a Redis Cluster; its embedded configuration loads as the
proxy in the container would load it. (tests/test_deploy.py holds every example, this one
included, to the rules all of them share.)"""

from __future__ import annotations

from pathlib import Path

from tests.test_deploy import DEPLOY, checked_proxies, documents, named, pod_spec

PATH = DEPLOY / "kubernetes" / "gateway-cluster.yaml"


def test_the_cluster_gateway_loads_with_a_cluster_store(tmp_path: Path) -> None:
    docs = documents(PATH)
    [(container, config)] = checked_proxies(PATH, tmp_path)
    session = config.session
    assert session.cluster and not session.sentinels
    assert session.redis_url is not None
    # The URL comes from the file's Secret, names a node by its Service, on database 0.
    [redis_env] = [e for e in container["env"] if e["name"] == "SENTINEL_REDIS_URL"]
    secret = named(docs, "Secret", redis_env["valueFrom"]["secretKeyRef"]["name"])
    assert session.redis_url.reveal() == secret["stringData"]["url"]
    assert session.redis_url.reveal().endswith(":6379/0")
    assert (config.server.workers, session.on_store_error) == (1, "closed")


def test_the_autoscaler_scales_the_deployment_on_cpu_and_owns_its_count(
    tmp_path: Path,
) -> None:
    docs = documents(PATH)
    [(container, _)] = checked_proxies(PATH, tmp_path)
    deployment = named(docs, "Deployment", "sentinel-gateway")
    hpa = named(docs, "HorizontalPodAutoscaler", "sentinel-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "sentinel-gateway",
    )
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is measured against the request: without one the autoscaler cannot act.
    assert container["resources"]["requests"]["cpu"]
    # A replicas field would reset the autoscaler's count at every apply.
    assert "replicas" not in deployment["spec"]


def test_the_disruption_budget_and_the_service_select_the_gateways_pods() -> None:
    docs = documents(PATH)
    deployment = named(docs, "Deployment", "sentinel-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = named(docs, "HorizontalPodAutoscaler", "sentinel-gateway")
    budget = named(docs, "PodDisruptionBudget", "sentinel-gateway")
    service = named(docs, "Service", "sentinel-gateway")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # At the smallest size, a voluntary disruption still leaves most replicas serving.
    assert budget["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"] / 2
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
