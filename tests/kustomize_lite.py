"""Renders the kustomize overlays in deploy/k8s the way `kubectl apply -k` would, for tests that run offline.

No kustomize binary is installable here (Debian has none; its kubectl 1.20 embeds kustomize 2.0.3, which
predates `patches` and directory `resources`), so this renders the subset the overlays use, and refuses
anything else instead of guessing:

- `resources`: YAML files and directories holding a kustomization.yaml (rendered recursively);
- `replicas`: `name` + `count` on a Deployment or StatefulSet;
- `patches`: `path` to one strategic-merge patch, whose apiVersion, kind and metadata.name name its target.
  Maps merge key by key (null deletes); lists of containers, initContainers, volumes, env and
  imagePullSecrets merge by `name`, volumeMounts by `mountPath`; every other list is replaced whole (as
  Kubernetes' schema says for args, command, envFrom, volumeClaimTemplates...). `ports` lists and `$patch`
  directives are refused: their merge keys differ by kind, and the overlays do not need them.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

yaml: Any = importlib.import_module("yaml")  # pyyaml ships no type stubs
Doc = dict[str, Any]
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "replicas", "patches"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "imagePullSecrets": "name", "volumeMounts": "mountPath"}
REFUSED_KEYS = {"ports"}


class KustomizeError(ValueError):
    """The kustomization uses something this subset does not render, or is wrong the way kustomize says."""


def render(directory: Path) -> list[Doc]:
    """The documents `kubectl kustomize directory` would print (in resource order, not kustomize's sort)."""
    kustomization = _load_one(directory / "kustomization.yaml")
    if unknown := set(kustomization) - SUPPORTED_KEYS:
        raise KustomizeError(f"{directory}: kustomization keys {sorted(unknown)} are not rendered by this subset")
    if kustomization.get("kind") != "Kustomization":
        raise KustomizeError(f"{directory}: kind must be Kustomization")
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(render(path) if path.is_dir() else _load_all(path))
    ids = [_id(d) for d in docs]
    if duplicates := {i for i in ids if ids.count(i) > 1}:
        raise KustomizeError(f"{directory}: resources defined twice: {sorted(duplicates)}")
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{directory}: only `path` patches are rendered, not {sorted(patch_entry)}")
        patch = _load_one(directory / patch_entry["path"])
        target = _find(docs, _id(patch), directory)
        docs[target] = merge(docs[target], patch)
    for replica in kustomization.get("replicas", []):
        matches = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and d["metadata"]["name"] == replica["name"]]
        if not matches:
            raise KustomizeError(f"{directory}: replicas for {replica['name']}, which no workload is")
        for doc in matches:
            doc["spec"]["replicas"] = int(replica["count"])
    return docs


def merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge of `patch` onto `base` (a new value; neither input changes)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if k in REFUSED_KEYS or str(k).startswith("$"):
                raise KustomizeError(f"a patch of `{k}` is outside the rendered subset")
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        merged = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(merged) if b.get(field) == item.get(field)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = merge(merged[at], item)
        return merged
    return copy.deepcopy(patch)


def _id(doc: Doc) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


def _find(docs: list[Doc], target: tuple[str, str, str], directory: Path) -> int:
    for i, doc in enumerate(docs):
        if _id(doc) == target:
            return i
    raise KustomizeError(f"{directory}: a patch targets {target}, which no resource is")


def _load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _load_one(path: Path) -> Doc:
    docs = _load_all(path)
    if len(docs) != 1:
        raise KustomizeError(f"{path}: one document expected, found {len(docs)}")
    return docs[0]
