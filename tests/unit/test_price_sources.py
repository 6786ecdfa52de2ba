"""The price catalog against its maintained source (LiteLLM's map), and where every rate came from.

The first test compares the shipped catalog with the map the installed `litellm` package ships, rate by rate
(standard, cached input, cache write, reasoning, batch and long-context), for every model LiteLLM lists under
the same provider. A difference either is fixed in the shipped catalog or is explained in KNOWN (and then
also in `data/overrides.json`, so `prices update` keeps the project's rate).
"""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from frugalstream.llm.pricing.catalog import DEFAULT_PATH, ModelPrice, PriceCatalog, Rates, _model_price
from frugalstream.llm.pricing.litellm import LiteLLMMap, match
from frugalstream.llm.pricing.update import PROJECT_OVERRIDES, build_catalog, catalog_file, write_catalog

KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")
# model -> (the differences expected, why the shipped rate is the right one)
KNOWN = {
    "gpt-3.5-turbo": ("batch: ours listed, LiteLLM none", "OpenAI's Batch API bills it at $0.25 / $0.75"),
    "mistral-large-latest": ("batch: ours listed, LiteLLM none", "Mistral's Batch API bills 50%"),
    "mistral-medium-latest": ("batch: ours listed, LiteLLM none", "Mistral's Batch API bills 50%"),
    "mistral-small-latest": ("batch: ours listed, LiteLLM none", "Mistral's Batch API bills 50%"),
}


def _rate_diffs(label: str, ours: Rates | None, theirs: Rates | None) -> list[str]:
    if ours is None or theirs is None:
        return [] if ours is theirs else [
            f"{label}: ours {'listed' if ours else 'none'}, LiteLLM {'listed' if theirs else 'none'}"]
    return [f"{label}.{k}: ours {getattr(ours, k)}, LiteLLM {getattr(theirs, k)}"
            for k in KINDS if getattr(ours, k) != getattr(theirs, k)]


def differences(ours: ModelPrice, theirs: ModelPrice) -> list[str]:
    out = _rate_diffs("standard", ours.standard, theirs.standard) + _rate_diffs("batch", ours.batch, theirs.batch)
    lo, lt = ours.long_context, theirs.long_context
    if (lo is None) != (lt is None) or (lo and lt and lo[0] != lt[0]):
        out.append(f"long_context threshold: ours {lo and lo[0]}, LiteLLM {lt and lt[0]}")
    elif lo is not None and lt is not None:
        out += _rate_diffs("long_context", lo[1], lt[1]) + _rate_diffs("long_context batch", lo[2], lt[2])
    if ours.context_window != theirs.context_window:
        out.append(f"context_window: ours {ours.context_window}, LiteLLM {theirs.context_window}")
    return out


def _litellm_installed() -> bool:
    try:
        metadata.distribution("litellm")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _litellm_installed(), reason="the `prices` extra (litellm) is not installed")
def test_shipped_rates_agree_with_litellm_or_are_explained() -> None:
    src = LiteLLMMap.installed()
    theirs, ours = src.models(), PriceCatalog.load()
    found: dict[str, list[str]] = {}
    compared = 0
    for model in ours.models:
        key = match(theirs, model, ours.provider(model))
        if key is None:
            continue
        compared += 1
        if diffs := differences(ours.rates(model), _model_price(key, theirs[key])):
            found[model] = diffs
    listing = "\n".join(f"  {m}: {'; '.join(d)}" for m, d in sorted(found.items()))
    unexplained = {m: d for m, d in found.items() if m not in KNOWN or d != [KNOWN[m][0]]}
    assert not unexplained, f"shipped catalog differs from {src.label}:\n{listing}"
    assert set(KNOWN) <= set(found), f"no longer different, remove from KNOWN: {set(KNOWN) - set(found)}"
    assert compared >= 15  # the check covers most of the catalog, not an empty intersection
    project = json.loads(PROJECT_OVERRIDES.read_text())
    assert set(KNOWN) <= set(project["models"]) and set(project["models"]) <= set(project["reasons"])


MAP: dict[str, Any] = {
    "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
    "gpt-x": {"litellm_provider": "openai", "max_input_tokens": 1000, "input_cost_per_token": 2e-06,
              "output_cost_per_token": 8e-06, "cache_read_input_token_cost": 5e-07,
              "input_cost_per_token_batches": 1e-06, "output_cost_per_token_batches": 4e-06,
              "cache_read_input_token_cost_batches": 2.5e-07},
    "claude-y": {"litellm_provider": "anthropic", "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                 "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
                 "input_cost_per_token_batches": 1.5e-06, "output_cost_per_token_batches": 7.5e-06,
                 "cache_read_input_token_cost_batches": 1.5e-07, "cache_creation_input_token_cost_batches": 1.875e-06},
    "gemini/flash-z": {"litellm_provider": "gemini", "input_cost_per_token": 3e-07, "output_cost_per_token": 2.5e-06,
                       "output_cost_per_reasoning_token": 2.5e-06, "input_cost_per_token_batches": 1.5e-07,
                       "output_cost_per_token_batches": 1.25e-06, "input_cost_per_token_above_200k_tokens": 6e-07,
                       "output_cost_per_token_above_200k_tokens": 5e-06,
                       "input_cost_per_token_above_200k_tokens_batches": 3e-07,
                       "output_cost_per_token_above_200k_tokens_batches": 2.5e-06},
    "old-w": {"litellm_provider": "vertex_ai-anthropic_models", "input_cost_per_token": 9e-06,  # a reseller
              "output_cost_per_token": 9e-06},
}


@pytest.fixture
def litellm_map(tmp_path: Path) -> LiteLLMMap:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(MAP))
    return LiteLLMMap.read(path, version="9.9.9")


def test_batch_cache_rates_and_long_context_batch_are_imported(litellm_map: LiteLLMMap) -> None:
    cat = PriceCatalog.from_litellm(litellm_map.path)
    x, y, z = cat.rates("gpt-x"), cat.rates("claude-y"), cat.rates("flash-z")
    assert x.batch is not None and x.batch.cached_input == Decimal("0.25")  # not the standard cached 0.5
    assert y.batch is not None and (y.batch.cached_input, y.batch.cache_write) == (Decimal("0.15"), Decimal("1.875"))
    # A reasoning rate equal to the output rate is the output rate: batch thinking gets the batch discount.
    assert z.batch is not None and z.batch.reasoning == Decimal("1.25") and z.standard.reasoning == Decimal("2.5")
    assert z.long_context is not None and z.long_context[0] == 200_000
    long_batch = z.long_context[2]
    assert long_batch is not None and (long_batch.input, long_batch.output) == (Decimal("0.3"), Decimal("2.5"))


def _shipped(tmp_path: Path) -> Path:
    doc = {"version": "2020-01-01.1", "as_of": "2020-01-01", "aliases": {"w": "old-w"}, "models": {
        "gpt-x": {"provider": "openai", "input": 9, "output": 9},  # stale: LiteLLM's rate must win
        "old-w": {"provider": "anthropic", "input": 1, "output": 2},  # only a reseller lists it: keep ours
        "retired-v": {"provider": "openai", "input": 4, "output": 5},  # LiteLLM dropped it: keep ours
        "gpu-tier": {"provider": "selfhosted", "gpu_hour_usd": 2, "tokens_per_s": 1000},
    }}
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps(doc))
    return path


def test_update_layers_litellm_shipped_selfhosted_and_project(litellm_map: LiteLLMMap, tmp_path: Path) -> None:
    project = tmp_path / "project.json"
    project.write_text(json.dumps({"version": "p1", "as_of": "2021-02-03", "reasons": {"gpt-x": "why"},
                                   "models": {"gpt-x": {"batch_output": 3}}}))
    doc = build_catalog(litellm_map, "2022-03-04", shipped=_shipped(tmp_path), project=project)
    cat = write_catalog(doc, tmp_path / "state" / "prices.json")
    assert cat.version.startswith("2022-03-04.litellm-9.9.9.") and cat.as_of == "2022-03-04"
    assert PriceCatalog.load(tmp_path / "state" / "prices.json").version == cat.version  # what was written loads
    x = cat.rates("gpt-x")
    assert x.standard.input == Decimal("2") and x.batch is not None and x.batch.output == Decimal("3")
    assert cat.source_of("gpt-x", "input").label.startswith("LiteLLM model price map (litellm 9.9.9")
    assert cat.source_of("gpt-x", "input").as_of == "2022-03-04"
    assert cat.source_of("gpt-x", "batch_output").label == "frugalstream project overrides p1"
    assert cat.source_of("gpt-x", "batch_output").as_of == "2021-02-03"
    for model in ("old-w", "retired-v", "gpu-tier"):
        assert cat.source_of(model, "provider").label == "shipped catalog 2020-01-01.1", model
    assert cat.rates("w").standard.input == Decimal("1")  # the reseller's $9 did not replace Anthropic's price
    assert cat.rates("gpu-tier").standard.input == Decimal("0.5555555556")
    assert cat.has("claude-y") and cat.rates("flash-z").provider == "gemini"


def test_services_load_the_configured_then_the_updated_then_the_shipped_catalog(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert catalog_file(None, state) == DEFAULT_PATH
    state.mkdir()
    (state / "prices.json").write_text(DEFAULT_PATH.read_text())
    assert catalog_file(None, state) == state / "prices.json"
    assert catalog_file(tmp_path / "mine.json", state) == tmp_path / "mine.json"


def test_overridden_rates_name_the_override_file(tmp_path: Path) -> None:
    over = tmp_path / "team.json"
    over.write_text(json.dumps({"version": "acme-1", "as_of": "2026-01-02", "models": {"gpt-4o": {"input": 2.0}}}))
    cat = PriceCatalog.load(overrides=over)
    assert cat.source_of("gpt-4o", "input").label == f"price overrides {over} (acme-1)"
    assert cat.source_of("gpt-4o", "output").label.startswith("shipped catalog ")
    assert cat.source_of("gpt-4o", "output").as_of == json.loads(DEFAULT_PATH.read_text())["as_of"]
