"""The deployment keeps its promises: probes on real endpoints, state on volumes, real commands, no torch.

Parsed, not run: compose and the Kubernetes manifests are read as YAML and checked against the code itself
(the probe server's routes, the CLI's parser, the settings' port), so a renamed endpoint or command fails here.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry

from frugalstream.bootstrap import SERVICE_NAMES
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.probes import Health, probe_app
from frugalstream.tools.cli import build_parser

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the deploy manifests")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: The services that keep state in FRUGAL_STATE_DIR (the accountant's ledger, the summarizer's store). The
#: gateway's paid calls and dedupe's cache are on compacted topics: a pod's disk could not serve other replicas.
STATEFUL = {"accountant", "summarizer"}


def _status(path: str) -> int:
    """What the real probe server answers on `path` (200/503 for a route, 404 for none)."""
    environ: dict[str, Any] = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    seen: list[str] = []
    b"".join(probe_app(Health(), Metrics(CollectorRegistry()))(environ, lambda status, headers: seen.append(status)))
    return int(seen[0].split()[0])


def _check_command(args: list[str]) -> None:
    """The container's arguments run an existing CLI command, and `serve` names services that exist."""
    parsed = build_parser().parse_args(args)
    if parsed.command == "serve":
        assert parsed.services, "one service per container"
        assert set(parsed.services) <= set(SERVICE_NAMES), parsed.services


def test_probe_paths_used_by_the_manifests_are_served() -> None:
    assert _status("/healthz") in (200, 503) and _status("/readyz") in (200, 503)
    assert _status("/metrics") == 200
    assert _status("/nope") == 404


def test_the_image_installs_the_cpu_only_default_and_runs_the_cli() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if re.search(r"pip install", line)]
    assert installs and all("torch" not in line and "[" not in line for line in installs), installs
    assert any(re.search(r"pip install \.(\s|$)", line) for line in installs)
    assert "find_spec('torch')" in text  # the build fails if torch reached the image anyway
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.split("[")[0].split(">")[0].split("=")[0].strip() == "torch" for dep in project["dependencies"])
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M)
    assert entrypoint and entrypoint.group(1) in project["scripts"]
    state_dir = re.search(r"FRUGAL_STATE_DIR=(\S+)", text)
    port = re.search(r"FRUGAL_METRICS_PORT=(\d+)", text)
    assert state_dir and state_dir.group(1) == "/var/lib/frugalstream" and port and port.group(1) == "9100"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def test_compose_services_have_health_checks_volumes_and_real_commands() -> None:
    doc = _compose()
    services = {name: svc for name, svc in doc["services"].items() if "serve" in (svc.get("command") or [])}
    assert {svc["command"][1] for svc in services.values()} == set(SERVICE_NAMES)  # every service runs
    for name, svc in services.items():
        env = svc["environment"]
        _check_command(svc["command"])
        check = " ".join(svc["healthcheck"]["test"])
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check)
        assert url, f"{name}: no probe URL in {check}"
        assert url.group(1) == env["FRUGAL_METRICS_PORT"] and _status(url.group(2)) != 404, name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        if svc["command"][1] in STATEFUL:
            assert env["FRUGAL_STATE_DIR"] in mounts, f"{name}: state dir not on a volume"
            assert mounts[env["FRUGAL_STATE_DIR"]] in doc["volumes"], f"{name}: not a named volume"
    topics = doc["services"]["topics"]
    _check_command(topics["command"])


K8S = DEPLOY / "k8s"
#: The kustomize base and every overlay, each checked as the manifests it renders to.
LAYOUTS = ["base", *sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())]


def _k8s(layout: str = "base") -> list[dict[str, Any]]:
    from tests.kustomize_lite import render

    return render(K8S / "base" if layout == "base" else K8S / "overlays" / layout)


def _probe(container: dict[str, Any], kind: str, ports: dict[str, int]) -> tuple[str, int]:
    get = container[kind]["httpGet"]
    port = get["port"]
    return get["path"], ports[port] if isinstance(port, str) else port


def _workloads(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_k8s_workloads_have_probes_volumes_and_real_commands(layout: str) -> None:
    docs = _k8s(layout)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    headless = {d["metadata"]["name"] for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"}
    served: set[str] = set()
    for workload in _workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        _check_command(container["args"])
        service = container["args"][1]
        served.add(service)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert _probe(container, "livenessProbe", ports) == ("/healthz", int(config["FRUGAL_METRICS_PORT"]))
        assert _probe(container, "readinessProbe", ports) == ("/readyz", int(config["FRUGAL_METRICS_PORT"]))
        if service in STATEFUL:
            assert workload["kind"] == "StatefulSet" and workload["spec"]["serviceName"] in headless
            claims = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
            mounted = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounted.get(config["FRUGAL_STATE_DIR"]) in claims, f"{service}: state dir not on a PVC"
    assert served == set(SERVICE_NAMES)


def _exported_series() -> set[str]:
    """Every sample name the metrics server can expose (counters as `_total`, histograms by their parts)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in Metrics(CollectorRegistry()).registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_every_series_the_dashboard_queries_is_exported() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"\bfrugal_[a-z_]+", target["expr"])}
    assert {"frugal_tokens_total", "frugal_errors_total", "frugal_consumer_lag", "frugal_budget_remaining_usd",
            "frugal_responses_total", "frugal_routing_reasons_total", "frugal_budget_downgrades_total",
            "frugal_context_trims_total", "frugal_verifier_decisions_total",
            "frugal_dedupe_decisions_total"} <= queried  # the dashboard charts what an operator alerts on
    assert queried <= _exported_series(), queried - _exported_series()
