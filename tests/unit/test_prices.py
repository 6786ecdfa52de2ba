"""Price catalog checked against hand-computed examples from the providers' published price sheets."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from frugalstream.llm.pricing.catalog import DEFAULT_PATH, PriceCatalog, UnknownModelError
from frugalstream.schemas import CostPoint, TokenUsage

REQUIRED = (
    "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini", "gpt-5", "gpt-5-mini",
    "gpt-5-nano", "gpt-3.5-turbo", "claude-opus-4", "claude-sonnet-4", "claude-3-5-haiku", "claude-haiku-4-5",
    "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash", "mistral-large-latest", "mistral-medium-latest",
    "mistral-small-latest", "llama-3.1-70b-int4-selfhosted", "llama-3.1-8b-selfhosted",
)


@pytest.fixture(scope="module")
def catalog() -> PriceCatalog:
    return PriceCatalog.load()


def usd(catalog: PriceCatalog, model: str, batch: bool = False, **tokens: int) -> Decimal:
    return catalog.price(CostPoint(model=model, usage=TokenUsage(**tokens), batch=batch))


def test_shipped_catalog_is_dated_and_complete(catalog: PriceCatalog) -> None:
    doc = json.loads(DEFAULT_PATH.read_text())
    assert doc["as_of"] and doc["version"] == catalog.version
    for model in REQUIRED:
        assert catalog.has(model), model
        r = catalog.rates(model)
        assert r.standard.cached_input <= r.standard.input and r.context_window
        if r.batch is not None:
            assert r.batch.input <= r.standard.input and r.batch.output <= r.standard.output


def test_gpt4o_one_million_in_and_out(catalog: PriceCatalog) -> None:
    # $2.50 input + $10.00 output per 1M tokens.
    assert usd(catalog, "gpt-4o", input_tokens=1_000_000, output_tokens=1_000_000) == Decimal("12.50")


def test_gpt4o_mini_cached_prompt(catalog: PriceCatalog) -> None:
    # 1000 prompt tokens of which 400 cached: 600 x $0.15 + 400 x $0.075 + 200 output x $0.60, per 1M.
    # = 90 + 30 + 120 = 240 micro-dollars.
    cost = usd(catalog, "gpt-4o-mini", input_tokens=600, cached_input_tokens=400, output_tokens=200)
    assert cost == Decimal("0.00024")
    assert isinstance(cost, Decimal)


def test_anthropic_cache_read_and_write_on_top_of_input(catalog: PriceCatalog) -> None:
    # Sonnet 4: input $3, cache read $0.30, 5-minute cache write $3.75 (1.25x), output $15.
    # 1000*3 + 10000*0.30 + 2000*3.75 + 500*15 = 3000 + 3000 + 7500 + 7500 = 21000 per 1M.
    cost = usd(catalog, "claude-sonnet-4", input_tokens=1000, cached_input_tokens=10_000,
               cache_write_tokens=2000, output_tokens=500)
    assert cost == Decimal("0.021")
    assert catalog.rates("claude-haiku-4-5").standard.cache_write == Decimal("1.25") * Decimal("1.00")


def test_batch_halves(catalog: PriceCatalog) -> None:
    assert usd(catalog, "gpt-4o", batch=True, input_tokens=1_000_000, output_tokens=1_000_000) == Decimal("6.25")
    full = usd(catalog, "claude-opus-4", input_tokens=1000, cached_input_tokens=2000, output_tokens=300)
    half = usd(catalog, "claude-opus-4", batch=True, input_tokens=1000, cached_input_tokens=2000, output_tokens=300)
    assert half * 2 == full  # Anthropic's batch discount stacks with cache reads


def test_batch_keeps_cached_rate_when_provider_lists_no_batch_cache(catalog: PriceCatalog) -> None:
    # gpt-4o batch: input $1.25; cached reads stay at $1.25 (no batch-cached rate listed).
    assert usd(catalog, "gpt-4o", batch=True, cached_input_tokens=1_000_000) == Decimal("1.25")


def test_reasoning_tokens_at_output_rate(catalog: PriceCatalog) -> None:
    # o3: input $2, output $8; 800 reasoning tokens billed like output: 1000*2 + (200+800)*8 = 10000 per 1M.
    assert usd(catalog, "o3", input_tokens=1000, output_tokens=200, reasoning_tokens=800) == Decimal("0.01")


def test_selfhosted_rate_from_gpu_hour(catalog: PriceCatalog) -> None:
    # $3/h at 800 tok/s: 3 / (800 * 3600) * 1e6 = 1.041666... per 1M, quantized to 1e-10.
    rate = catalog.rates("llama-3.1-70b-int4-selfhosted").standard.input
    assert rate == Decimal("1.0416666667")
    assert usd(catalog, "llama-3.1-70b-int4-selfhosted", input_tokens=500_000, output_tokens=500_000) == rate
    assert catalog.rates("llama-3.1-8b-selfhosted").standard.output == Decimal("0.1111111111")
    assert catalog.provider("llama-3.1-8b-selfhosted") == "selfhosted"


def test_long_context_tier(catalog: PriceCatalog) -> None:
    # Gemini 2.5 Pro: $1.25 up to 200k prompt tokens, $2.50 above (for the whole prompt).
    assert usd(catalog, "gemini-2.5-pro", input_tokens=200_000) == Decimal("0.25")
    assert usd(catalog, "gemini-2.5-pro", input_tokens=300_000) == Decimal("0.75")


@pytest.mark.parametrize(("alias", "canonical"), [
    ("gpt-4o-2024-08-06", "gpt-4o"), ("openai/gpt-4o", "gpt-4o"), ("OpenAI/GPT-4o", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("anthropic/claude-opus-4-1-20250805", "claude-opus-4"), ("models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"), ("mistral-large", "mistral-large-latest"),
    ("mistral-small-2503", "mistral-small-2506"),  # a dated snapshot keeps its price when `-latest` moves on
    ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
])
def test_aliases(catalog: PriceCatalog, alias: str, canonical: str) -> None:
    assert catalog.resolve(alias) == canonical


def test_dated_snapshot_with_its_own_price_is_not_collapsed(catalog: PriceCatalog) -> None:
    # gpt-4o-2024-05-13 still lists at $5 / $15, not gpt-4o's $2.50 / $10.
    assert usd(catalog, "gpt-4o-2024-05-13", input_tokens=1_000_000, output_tokens=1_000_000) == Decimal("20")


def test_unknown_model_lists_close_names(catalog: PriceCatalog) -> None:
    with pytest.raises(UnknownModelError) as err:
        usd(catalog, "gpt4o-mini", input_tokens=1)
    assert "gpt-4o-mini" in str(err.value)
    assert not catalog.has("llama-9-1t")


def test_litellm_import(tmp_path: Path) -> None:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text("""{
      "sample_spec": {"max_tokens": "set to max_output_tokens", "input_cost_per_token": 0.0,
                      "output_cost_per_token": 0.0, "litellm_provider": "one of https://docs.litellm.ai/"},
      "gpt-4o": {"max_input_tokens": 128000, "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                 "cache_read_input_token_cost": 1.25e-06, "input_cost_per_token_batches": 1.25e-06,
                 "output_cost_per_token_batches": 5e-06, "litellm_provider": "openai", "mode": "chat"},
      "anthropic/claude-x": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                 "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
                 "output_cost_per_reasoning_token": 2e-05, "litellm_provider": "anthropic"},
      "dall-e-3": {"output_cost_per_image": 0.04, "litellm_provider": "openai", "mode": "image_generation"}
    }""")
    cat = PriceCatalog.from_litellm(path)
    assert cat.version.startswith("litellm-")
    assert not cat.has("sample_spec") and not cat.has("dall-e-3")
    assert usd(cat, "gpt-4o-2024-08-06", input_tokens=1_000_000, output_tokens=1_000_000) == Decimal("12.5")
    assert usd(cat, "gpt-4o", batch=True, input_tokens=1_000_000, cached_input_tokens=1_000_000) == Decimal("2.5")
    assert cat.rates("gpt-4o").context_window == 128000
    # 1000*3 + 1000*0.30 + 1000*3.75 + 1000*15 + 1000*20 = 42050 per 1M; bare name resolves to the prefixed key.
    cost = usd(cat, "claude-x", input_tokens=1000, cached_input_tokens=1000, cache_write_tokens=1000,
               output_tokens=1000, reasoning_tokens=1000)
    assert cost == Decimal("0.04205")


def test_overrides_merge_per_model(tmp_path: Path) -> None:
    over = tmp_path / "team.json"
    over.write_text(json.dumps({
        "version": "acme-2025-09",
        "models": {
            "gpt-4o": {"input": 2.0},  # negotiated input rate; everything else stays the list price
            "acme-ft-small": {"provider": "openai", "input": 0.3, "output": 1.2},
            "llama-3.1-8b-selfhosted": {"gpu_hour_usd": 2.0},  # their GPUs cost more
        },
    }))
    base = PriceCatalog.load()
    cat = PriceCatalog.load(overrides=over)
    assert cat.version.startswith(f"{base.version}+acme-2025-09.") and cat.version != base.version
    assert usd(cat, "gpt-4o", input_tokens=1_000_000, output_tokens=1_000_000) == Decimal("12.0")
    batch, base_batch = cat.rates("gpt-4o").batch, base.rates("gpt-4o").batch
    assert batch is not None and base_batch is not None
    assert (batch.input, batch.output) == (base_batch.input, base_batch.output)
    assert usd(cat, "acme-ft-small", input_tokens=1_000_000) == Decimal("0.3")
    assert cat.rates("llama-3.1-8b-selfhosted").standard.input == Decimal("0.2222222222")


def test_invalid_entries_fail_loudly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "x", "models": {"m": {"provider": "p", "input": 1, "ouput": 2}}}))
    with pytest.raises(ValueError, match="ouput"):
        PriceCatalog.load(bad)
    bad.write_text(json.dumps({"version": "x", "models": {"m": {"provider": "p", "input": -1, "output": 2}}}))
    with pytest.raises(ValueError):
        PriceCatalog.load(bad)


def test_conservative_rates_are_the_catalog_maximum_of_each_kind(catalog: PriceCatalog, tmp_path: Path) -> None:
    top = catalog.conservative_rates
    kinds = ("input", "cached_input", "cache_write", "output", "reasoning")
    for model in catalog.models:
        m = catalog.rates(model)
        for rates in (m.standard, m.batch, *(m.long_context[1:] if m.long_context else ())):
            assert rates is None or all(getattr(rates, k) <= getattr(top, k) for k in kinds), model
    assert top.output == max(catalog.rates(m).standard.output for m in catalog.models)
    point = CostPoint(model="not-in-any-catalog", usage=TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000))
    assert catalog.price_conservative(point) == top.input + top.output
    # A team's own (dearer) price raises the conservative rate with it.
    over = tmp_path / "over.json"
    over.write_text(json.dumps({"version": "team", "models": {"in-house-xl": {
        "provider": "self", "input": 40, "output": 200}}}))
    dear = PriceCatalog.load(overrides=over).conservative_rates
    assert (dear.input, dear.output) == (Decimal(40), Decimal(200))
