"""The deployment files are valid for the tools that read them, offline: every Kubernetes manifest (the base and
each rendered overlay) against the Kubernetes JSON schemas, the compose file with `docker-compose config`, the
Prometheus rules against the exported series; and the overlays keep their promises (replicas within the
partitions, resources, disruption budgets, an autoscaler that cannot outgrow the partitions)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.kustomize_lite import KustomizeError, merge, render
from tests.unit.test_deploy import DEPLOY, K8S, LAYOUTS, _exported_series, _k8s

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the deploy manifests")
#: The consumer groups whose replicas share partitions (the stateful services run one replica).
SCALED = ("classifier", "dedupe", "gateway")


def _validator() -> Any:
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships the Kubernetes schemas")


def _versions() -> list[str]:
    """The oldest and the newest Kubernetes version whose schemas the installed package ships."""
    utils = pytest.importorskip("kubernetes_validate.utils")
    versions: list[str] = utils.all_versions()
    return sorted({versions[0], versions[-1]})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_manifest_validates_against_the_kubernetes_schemas(layout: str) -> None:
    kv = _validator()
    docs = _k8s(layout)
    assert docs
    for version in _versions():
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)  # strict: an unknown (misspelt) field fails too
            except kv.ValidationError as e:
                raise AssertionError(f"{layout}: {doc['kind']}/{doc['metadata']['name']} against {version}: "
                                     f"{'.'.join(map(str, e.path))}: {e.message}") from None


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type() -> None:
    kv = _validator()
    deployment = next(d for d in _k8s() if d["kind"] == "Deployment")
    misspelt = merge(deployment, {"spec": {"template": {"spec": {"containers": [
        {"name": deployment["spec"]["template"]["spec"]["containers"][0]["name"], "livenessprobe": {}}]}}}})
    for bad in (misspelt, merge(deployment, {"spec": {"replicas": "two"}})):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, _versions()[-1], strict=True)


def _topic_partitions(docs: list[dict[str, Any]]) -> int:
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "frugalstream-topics")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "topics"
    return int(args[args.index("--partitions") + 1])


def _replicas(docs: list[dict[str, Any]]) -> dict[str, int]:
    return {d["metadata"]["labels"]["service"]: d["spec"].get("replicas", 1) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replicas_and_autoscalers_stay_within_the_partitions(layout: str) -> None:
    """A group member beyond the partition count idles: replicas, and an autoscaler's maximum, must fit."""
    docs = _k8s(layout)
    partitions = _topic_partitions(docs)
    replicas = _replicas(docs)
    assert all(replicas[s] <= partitions for s in SCALED), (replicas, partitions)
    workloads = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = workloads[(ref["kind"], ref["name"])]
        assert hpa["spec"]["maxReplicas"] <= partitions, f"{ref['name']} could outgrow {partitions} partitions"
        assert hpa["spec"]["minReplicas"] <= target["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"


def test_small_runs_one_of_each_and_scaled_runs_more_with_budgets_and_limits() -> None:
    base, small, scaled = _k8s("base"), _k8s("small"), _k8s("scaled")
    assert set(_replicas(small).values()) == {1}
    assert all(_replicas(scaled)[s] > _replicas(base)[s] for s in SCALED), _replicas(scaled)
    assert _topic_partitions(scaled) > _topic_partitions(base)
    budgets = [d for d in scaled if d["kind"] == "PodDisruptionBudget"]
    for workload in (d for d in scaled if d["kind"] in ("Deployment", "StatefulSet")):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for container in workload["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], \
                workload["metadata"]["name"]
        if workload["spec"]["replicas"] > 1:
            (pdb,) = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert pdb["spec"]["maxUnavailable"] < workload["spec"]["replicas"]


def test_the_renderer_merges_like_kustomize_and_refuses_what_it_does_not_render(tmp_path: Path) -> None:
    base = {"spec": {"replicas": 2, "containers": [{"name": "a", "args": ["x", "y"], "image": "i"}, {"name": "b"}]}}
    patched = merge(base, {"spec": {"containers": [{"name": "a", "args": ["z"]}, {"name": "c"}], "replicas": None}})
    assert patched == {"spec": {"containers": [{"name": "a", "args": ["z"], "image": "i"}, {"name": "b"},
                                               {"name": "c"}]}}, "keyed lists merge, other lists are replaced"
    assert base["spec"]["replicas"] == 2, "the inputs are left as they were"
    with pytest.raises(KustomizeError):
        merge(base, {"spec": {"ports": [{"containerPort": 1}]}})
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(K8S / "base")], "patches": [{"path": "p.yaml"}]}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "frugalstream-nope"}}))
    with pytest.raises(KustomizeError, match="no resource"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("kind: Kustomization\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose (Debian's package) is not installed")
def test_compose_file_passes_docker_compose_config(tmp_path: Path) -> None:
    """`docker-compose config` reads, interpolates and validates the file against the compose schema; it needs
    no Docker daemon. A misspelt key must fail it, or the check proves nothing."""
    assert DOCKER_COMPOSE is not None
    good = subprocess.run([DOCKER_COMPOSE, "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("healthcheck:", "healthchek:", 1))
    bad = subprocess.run([DOCKER_COMPOSE, "-f", str(broken), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "healthchek" in bad.stderr, bad.stderr


def test_prometheus_rules_use_exported_series_and_record_before_use() -> None:
    groups = yaml.safe_load((DEPLOY / "prometheus-rules.yaml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert "frugal:cache_hit_ratio:rate5m" in recorded
    assert all(re.fullmatch(r"frugal:[a-z_]+:[a-z0-9_]+", name) for name in recorded), recorded
    exprs = " ".join(rule["expr"] for rule in rules)
    assert set(re.findall(r"\bfrugal_[a-z_]+", exprs)) <= _exported_series()
    assert set(re.findall(r"\bfrugal:[a-z_]+:[a-z0-9_]+", exprs)) <= recorded
    assert all(rule["labels"]["severity"] for rule in rules if "alert" in rule)
