"""Builds a dated catalog from LiteLLM's price map with the project's layers on top (`frugalstream prices update`).

Layers, lowest first, each rate remembering the layer it came from:
1. the shipped catalog, only for models the map cannot price at all (it drops retired models that callers
   may still pin, and their spend must still be priced);
2. LiteLLM's map (every model with per-token prices);
3. the shipped self-hosted tiers (GPU $/h over measured tokens/s: no public source knows them);
4. the project's own corrections, `data/overrides.json`, each with the reason it exists.
A team's own `FRUGAL_PRICE_OVERRIDES` still go on top when the catalog is loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

from frugalstream.llm.pricing.catalog import DEFAULT_PATH, PriceCatalog, check_unit
from frugalstream.llm.pricing.litellm import LiteLLMMap, bare_aliases, match

PROJECT_OVERRIDES = Path(__file__).with_name("data") / "overrides.json"
UPDATED_NAME = "prices.json"


def catalog_file(configured: Path | None, state_dir: Path) -> Path:
    """The catalog services load: the configured file, else `<state_dir>/prices.json` once `prices update`
    has written it, else the shipped one."""
    if configured is not None:
        return configured
    updated = state_dir / UPDATED_NAME
    return updated if updated.is_file() else DEFAULT_PATH


def _load_json(path: Path) -> dict[str, Any]:
    """A catalog or overrides file as JSON; its `unit`, when given, is checked like `PriceCatalog.load` does."""
    doc: dict[str, Any] = json.loads(path.read_text())
    if "unit" in doc:
        try:
            check_unit(doc["unit"])
        except ValueError as exc:
            raise ValueError(f"price catalog {path} is invalid: {exc}") from exc
    return doc


def build_catalog(src: LiteLLMMap, today: str, shipped: Path = DEFAULT_PATH,
                  project: Path = PROJECT_OVERRIDES) -> dict[str, Any]:
    """The catalog document (our file format) of the layers above; validated by loading it before return."""
    base, extra = _load_json(shipped), _load_json(project)
    litellm = src.models()
    models: dict[str, dict[str, Any]] = dict(litellm)
    provenance: dict[str, Any] = {}
    matched: dict[str, str] = {}
    for name, entry in base["models"].items():
        key = match(litellm, name, entry["provider"])
        if key is None or entry["provider"] == "selfhosted":
            models[name.lower()], provenance[name.lower()] = dict(entry), "shipped"
        elif key != name.lower():  # `gemini-2.5-pro` is Google's price, not the Vertex entry of that name
            models[name.lower()], matched[name.lower()] = {**litellm[key], "provider": entry["provider"]}, key
    for name, entry in extra.get("models", {}).items():
        for key in {name.lower(), matched.get(name.lower(), name.lower())}:
            models[key] = {**models.get(key, {}), **entry}
            before = provenance.get(key, "litellm")
            provenance[key] = {"*": before if isinstance(before, str) else before["*"],
                               **dict.fromkeys(entry, "project")}
    aliases = bare_aliases(models)
    for alias, target in {**base.get("aliases", {}), **extra.get("aliases", {})}.items():
        target = aliases.get(target.lower(), target.lower())
        if alias.lower() not in models and target in models:
            aliases[alias.lower()] = target
    doc = {
        "version": f"{today}.litellm-{src.version}.{src.sha256[:8]}",
        "as_of": today,
        "currency": "USD",
        "unit": "USD per 1M tokens",
        "notes": [f"Written by `frugalstream prices update` on {today}; sources lists where each rate came from.",
                  *base.get("notes", [])[1:]],
        "sources": {
            "litellm": {"label": src.label, "as_of": today},
            "shipped": {"label": f"shipped catalog {base['version']}", "as_of": base.get("as_of")},
            "project": {"label": f"frugalstream project overrides {extra.get('version', '')}".strip(),
                        "as_of": extra.get("as_of")},
        },
        "provenance": dict(sorted(provenance.items())),
        "aliases": dict(sorted(aliases.items())),
        "models": dict(sorted(models.items())),
    }
    out: dict[str, Any] = json.loads(json.dumps(doc, default=_number))  # Decimal -> JSON number
    return out


def _number(value: Any) -> Any:
    if isinstance(value, Decimal):
        return json.loads(str(value))  # an exact short decimal becomes a float only when written
    raise TypeError(f"{type(value).__name__} is not JSON")


def write_catalog(doc: dict[str, Any], path: Path) -> PriceCatalog:
    """Writes atomically (a half-written catalog must never be loaded) after checking that it loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".prices-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=False)
            f.write("\n")
        catalog = PriceCatalog.load(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return catalog
