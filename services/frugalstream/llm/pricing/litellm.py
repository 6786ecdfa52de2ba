"""LiteLLM's model price map, read as data: USD per token -> our catalog entries in USD per 1M tokens.

The `litellm` package (the `prices` extra) ships the map as a JSON file; it is read from the installed
distribution's files without importing litellm (its import takes seconds and pulls half of PyPI). Only
per-token prices are taken: entries priced per image, second or character have no place in a token catalog.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow, localcontext
from importlib import metadata
from pathlib import Path
from typing import Any

MAP_FILE = "litellm/model_prices_and_context_window_backup.json"
_PER_MILLION = Decimal(1_000_000)
_EXACT = Context(prec=80, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
_LONG = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")
# Our provider name -> LiteLLM's, where they differ (LiteLLM's `gemini` is Google AI Studio's API).
PROVIDERS = {"google": "gemini"}

# Our rate -> LiteLLM's key (standard and batch). `_batches` suffixes are the provider's batch-API prices.
FIELDS = {
    "input": "input_cost_per_token", "output": "output_cost_per_token",
    "cached_input": "cache_read_input_token_cost", "cache_write": "cache_creation_input_token_cost",
    "reasoning": "output_cost_per_reasoning_token",
    "batch_input": "input_cost_per_token_batches", "batch_output": "output_cost_per_token_batches",
    "batch_cached_input": "cache_read_input_token_cost_batches",
    "batch_cache_write": "cache_creation_input_token_cost_batches",
}


@dataclass(frozen=True)
class LiteLLMMap:
    """One copy of the map: where it came from (package version, file hash) and its parsed JSON."""

    path: Path
    version: str
    sha256: str
    doc: Mapping[str, Any]

    @classmethod
    def read(cls, path: Path, version: str = "unknown") -> LiteLLMMap:
        data = path.read_bytes()
        return cls(path, version, hashlib.sha256(data).hexdigest(), json.loads(data, parse_float=Decimal))

    @classmethod
    def installed(cls) -> LiteLLMMap:
        """The map inside the installed `litellm` distribution; LookupError (with the fix) when absent."""
        try:
            dist = metadata.distribution("litellm")
        except metadata.PackageNotFoundError:
            raise LookupError("the litellm package is not installed: pip install 'frugalstream[prices]', "
                              "or pass --source with a copy of model_prices_and_context_window.json") from None
        path = Path(str(dist.locate_file(MAP_FILE)))
        if not path.is_file():
            raise LookupError(f"litellm {dist.version} has no {MAP_FILE}; pass --source with a copy of the map")
        return cls.read(path, dist.version)

    @property
    def label(self) -> str:
        return f"LiteLLM model price map (litellm {self.version}, sha256 {self.sha256[:12]})"

    def models(self) -> dict[str, dict[str, Any]]:
        """Lower-cased name -> our entry, for every entry with per-token input and output prices."""
        return {name.lower(): entry for name, spec in self.doc.items()
                if name != "sample_spec" and isinstance(spec, Mapping) and (entry := to_entry(spec))}


def match(models: Mapping[str, Mapping[str, Any]], name: str, provider: str) -> str | None:
    """LiteLLM's key for our model `name` sold by `provider`: the bare name when LiteLLM lists it under that
    provider, else `<provider>/<name>`. A reseller's entry (Vertex, Bedrock, Azure) is not the same price list."""
    theirs = PROVIDERS.get(provider, provider)
    for key in (name.lower(), f"{theirs}/{name.lower()}"):
        if key in models and models[key].get("provider") == theirs:
            return key
    return None


def bare_aliases(models: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """`gemini/gemini-2.5-pro` also answers to `gemini-2.5-pro` when exactly one prefixed key has that name, or
    when several do and exactly one is the provider's own (`mistral/...` served by mistral, not a reseller)."""
    bare = Counter(name.rsplit("/", 1)[1] for name in models if "/" in name)
    own = Counter(name.rsplit("/", 1)[1] for name in models if "/" in name and _own(name, models[name]))
    return {b: name for name in models if "/" in name
            if (b := name.rsplit("/", 1)[1]) not in models
            and (bare[b] == 1 or (own[b] == 1 and _own(name, models[name])))}


def _own(name: str, entry: Mapping[str, Any]) -> bool:
    return name.split("/", 1)[0] == entry.get("provider")


def _rate(spec: Mapping[str, Any], key: str) -> Decimal | None:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        return None
    with localcontext(_EXACT):
        return Decimal(value) * _PER_MILLION


def _rates(spec: Mapping[str, Any], suffix: str = "") -> dict[str, Decimal]:
    """Our rate fields from LiteLLM's keys; `suffix` picks a long-context variant (`_above_200k_tokens`)."""
    out: dict[str, Decimal] = {}
    for ours, theirs in FIELDS.items():
        key = theirs.replace("_batches", f"{suffix}_batches") if theirs.endswith("_batches") else theirs + suffix
        if (value := _rate(spec, key)) is not None:
            out[ours] = value
    if ("batch_input" in out) != ("batch_output" in out):  # half a batch price: treat as no batch offer
        out = {k: v for k, v in out.items() if not k.startswith("batch_")}
    if "batch_input" not in out:  # batch cache rates without a batch offer mean nothing
        out = {k: v for k, v in out.items() if not k.startswith("batch_")}
    return out


def to_entry(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """Our entry format, or None for entries without per-token prices (images, audio seconds...)."""
    entry: dict[str, Any] = _rates(spec)
    if "input" not in entry or "output" not in entry:
        return None
    if entry.get("reasoning") == entry["output"]:  # just the output rate: let batch work get its discount
        del entry["reasoning"]
    entry["provider"] = str(spec.get("litellm_provider") or "unknown")
    window = spec.get("max_input_tokens", spec.get("max_tokens"))
    if type(window) is int and window > 0:
        entry["context_window"] = window
    for key in sorted(spec):
        if (m := _LONG.match(key)) and _rate(spec, key) is not None:
            k = m.group(1)
            long = _rates(spec, f"_above_{k}k_tokens")
            long.setdefault("output", entry["output"])
            entry["long_context"] = {"threshold": int(k) * 1000, **long}
            break
    return entry
