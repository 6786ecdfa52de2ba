"""Pricing against what a hostile review found: a rate file per 1K tokens read as per 1M, an unlisted dated
snapshot priced as the moving `-latest` model, and a saving header measured against another baseline than the
ledger's."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.http_entry.pricing import Pricer
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import price_usage
from frugalstream.llm.pricing.litellm import LiteLLMMap
from frugalstream.llm.pricing.update import build_catalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.usage import llm_usage
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import ChatMessage, CostPoint, LLMRequest, LLMResponse, TokenUsage, UsageRecord
from tests.unit.test_accounting_hardening import _routed_under_over_budget

CATALOG = PriceCatalog.load()
MILLION = TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000)


def usd(catalog: PriceCatalog, model: str) -> Decimal:
    return catalog.price(CostPoint(model=model, usage=MILLION))


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


# --- 1. a rate file says its unit, and only USD per 1M tokens is read ------------------------------------------

@pytest.mark.parametrize("unit", ["USD per 1K tokens", "USD per token", "usd per 1m tokens", None])
@pytest.mark.parametrize("which", ["catalog", "overrides"])
def test_a_rate_file_in_another_unit_is_refused_at_load(tmp_path: Path, which: str, unit: str | None) -> None:
    """OpenAI's old price page and most spreadsheets give rates per 1K tokens: read as per 1M, every model would
    bill 1000x too little and every budget trip 1000x late."""
    doc = {"version": "team-1", "currency": "USD", "unit": unit,
           "models": {"gpt-4o": {"provider": "openai", "input": 0.0025, "output": 0.01}}}
    path = write(tmp_path / f"{which}.json", doc)
    with pytest.raises(ValueError, match="USD per 1M tokens") as err:
        PriceCatalog.load(path) if which == "catalog" else PriceCatalog.load(overrides=path)
    assert str(path) in str(err.value)


def test_a_rate_file_per_1m_or_silent_on_its_unit_loads(tmp_path: Path) -> None:
    for name, extra in (("said.json", {"unit": "USD per 1M tokens"}), ("silent.json", {})):
        over = write(tmp_path / name, {"version": "team-1", **extra, "models": {"gpt-4o": {"input": 2.0}}})
        assert usd(PriceCatalog.load(overrides=over), "gpt-4o") == Decimal("12.0")


def test_prices_update_refuses_a_project_file_per_1k(tmp_path: Path) -> None:
    src = write(tmp_path / "map.json", {"gpt-x": {"litellm_provider": "openai", "input_cost_per_token": 2e-06,
                                                  "output_cost_per_token": 8e-06}})
    project = write(tmp_path / "project.json", {"version": "p1", "unit": "USD per 1K tokens",
                                                "models": {"gpt-x": {"batch_output": 0.003}}})
    with pytest.raises(ValueError, match="USD per 1M tokens"):
        build_catalog(LiteLLMMap.read(src), "2026-01-01", project=project)


# --- 2. a dated snapshot the catalog does not list ----------------------------------------------------------

def test_an_unlisted_dated_snapshot_is_not_priced_as_the_moving_latest_model() -> None:
    """The catalog prices `mistral-large-2411` at $2 / $6 and `mistral-large-latest` (Large 3) at $0.50 / $1.50;
    `mistral-large-2407` ($2 / $6 at Mistral) was resolved date-stripped to `mistral-large`, an alias of
    `-latest`: billed at a quarter of its price, unflagged, and a pin to it served."""
    assert not CATALOG.has("mistral-large-2407") and not CATALOG.has("mistral/mistral-large-2407")
    record = UsageRecord(id="u1", request_id="r1", tenant="acme", stage="gateway", source="llm",
                         baseline=CostPoint(model="mistral-large-2407", usage=MILLION),
                         actual_model="mistral-large-2407", occurred_at=time.time())
    data = price_usage(record, CATALOG)
    assert data.price_unknown and data.unpriced_models == ("mistral-large-2407",)
    assert Decimal(repr(data.actual_cost_usd)) >= usd(CATALOG, "mistral-large-2411")


def test_a_dated_snapshot_never_resolves_through_a_latest_alias(tmp_path: Path) -> None:
    """Even in a family that lists no dated snapshot of its own: `-latest` moves to the provider's newest model."""
    cat = PriceCatalog.load(write(tmp_path / "c.json", {
        "version": "1", "aliases": {"big": "big-latest", "small": "small-latest"},
        "models": {"big-latest": {"provider": "p", "input": 1, "output": 2},
                   "small-latest": {"provider": "p", "input": 1, "output": 2},
                   "small-2405": {"provider": "p", "input": 3, "output": 4}}}))
    for snapshot in ("big-2407", "big-20240701", "big-2024-07-01", "p/big-2407", "small-2407"):
        assert not cat.has(snapshot), snapshot
    assert cat.resolve("big") == cat.resolve("p/big-latest") == "big-latest"
    assert cat.resolve("small-2405") == "small-2405"


def test_an_unlisted_date_of_a_family_that_lists_its_own_dates_is_unknown(tmp_path: Path) -> None:
    cat = PriceCatalog.load(write(tmp_path / "c.json", {
        "version": "1", "aliases": {"m-0125": "m"},
        "models": {"m": {"provider": "p", "input": 1, "output": 2},
                   "m-0613": {"provider": "p", "input": 3, "output": 4},
                   "n": {"provider": "p", "input": 5, "output": 6}}}))
    assert cat.resolve("m-0125") == "m" and cat.resolve("p/m-0613") == "m-0613"
    assert not cat.has("m-1106") and not cat.has("m-2024-11-06")
    assert cat.resolve("n-1106") == cat.resolve("n-2024-11-06") == "n"  # a family without dates: the same price


@pytest.mark.parametrize(("model", "rates"), [
    # The catalog's notes: dated snapshots keep their own prices, retired ones their launch prices.
    ("gpt-3.5-turbo-0125", ("0.5", "1.5")), ("gpt-3.5-turbo-1106", ("1", "2")), ("gpt-3.5-turbo-0613", ("1.5", "2")),
    ("gpt-4o-2024-08-06", ("2.5", "10")), ("gpt-4o-2024-11-20", ("2.5", "10")), ("gpt-4o-2024-05-13", ("5", "15")),
    ("gpt-4o-mini-2024-07-18", ("0.15", "0.6")), ("mistral-small-2503", ("0.1", "0.3")),
])
def test_dated_snapshots_are_priced_at_their_own_rates(model: str, rates: tuple[str, str]) -> None:
    std = CATALOG.rates(model).standard
    assert (std.input, std.output) == (Decimal(rates[0]), Decimal(rates[1]))


def test_shipped_families_with_dated_snapshots_do_not_price_an_unlisted_date() -> None:
    for model in ("gpt-3.5-turbo-0301", "gpt-4o-2025-01-01", "mistral-small-2409", "mistral-medium-2312"):
        assert not CATALOG.has(model), model


# --- 3. the saving header measures against the ledger's baseline --------------------------------------------

ASK = (ChatMessage(role="user", content="What are your opening hours?"),)


async def _routed(settings: Settings, model: str | None) -> Routed:
    [res] = await Classifier(settings, TokenCounter(), catalog=CATALOG).handle(
        [LLMRequest(id="q1", tenant="acme", model=model, messages=ASK)])
    assert isinstance(res, Routed), res
    return res


def _header_and_ledger(settings: Settings, res: Routed) -> tuple[str, str]:
    route = res.routed.route
    usage = TokenUsage(input_tokens=route.full_input_tokens, output_tokens=10)  # billed: the prompt as counted
    answer = LLMResponse(request_id="q1", tenant="acme", source="llm", content="9 to 5.", model=route.model,
                         tier=route.tier, task_type=route.task_type, finish_reason="stop", usage=usage,
                         responded_at=time.time())
    ledger = price_usage(llm_usage(res.routed, route.model, usage), CATALOG)
    header = Pricer(settings, CATALOG, TokenCounter()).estimate(res.routed.request, answer)
    assert header.baseline_usd == Decimal(repr(ledger.baseline_cost_usd))
    return header.baseline_model, ledger.baseline_model


@pytest.mark.parametrize("pin", ["made-up-ultra-9000", "gpt-4.1"])
async def test_the_saving_header_uses_the_ledgers_baseline_for_a_pin_a_budget_dropped(pin: str) -> None:
    """A pin the catalog cannot price, dropped by an over budget, is not the ledger's baseline (the default is):
    priced as the baseline at the catalog's top rates, the header told of a saving ~6x what the ledger records."""
    res = await _routed_under_over_budget(pin)
    assert res.routed.route.downgraded_by_budget
    header, ledger = _header_and_ledger(Settings(), res)
    assert header == ledger == (pin if CATALOG.has(pin) else Settings().default_baseline_model)


@pytest.mark.parametrize(("policy", "pin", "baseline"), [
    (TenantPolicy(allow_unpriced_models=True), "made-up-ultra-9000", "made-up-ultra-9000"),  # served: its own
    (TenantPolicy(baseline_model="gpt-4.1"), None, "gpt-4.1"),
    (TenantPolicy(baseline_model="gpt-4.1"), "gpt-4o-mini", "gpt-4.1"),
    (TenantPolicy(baseline_model="no-such-model"), None, Settings().default_baseline_model),
])
async def test_the_saving_header_and_the_ledger_agree_on_the_baseline(policy: TenantPolicy, pin: str | None,
                                                                      baseline: str) -> None:
    settings = Settings(tenants={"acme": policy})
    header, ledger = _header_and_ledger(settings, await _routed(settings, pin))
    assert header == ledger == baseline
