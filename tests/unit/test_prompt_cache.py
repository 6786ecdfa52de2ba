"""Provider prompt caching: breakpoints only where a prefix repeats, the simulator's cached-input accounting, and
the `prompt_cache` strategy in the usage chain (reconciling exactly, negative when a write did not pay back)."""

from __future__ import annotations

from decimal import Decimal

from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import price_chain, price_usage
from frugalstream.llm.prompt_cache import CachePlan, PrefixTracker, PromptCachePlanner, canonical_tools
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.usage import llm_usage
from frugalstream.schemas import CacheKeys, ChatMessage, LLMRequest, Route, RoutedRequest, SamplingParams, TokenUsage

LONG = ChatMessage(role="system", content="Label guidelines: " + "tag each ticket by its main intent. " * 200)
SHORT = ChatMessage(role="system", content="You are terse.")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ask(system: ChatMessage, text: str) -> tuple[ChatMessage, ...]:
    return (system, ChatMessage(role="user", content=text))


def test_breakpoint_only_on_a_long_prefix_seen_again_within_the_lifetime() -> None:
    clock = Clock()
    planner = PromptCachePlanner(TokenCounter(), ttl_s=300, tracker=PrefixTracker(300, clock=clock))
    assert not planner.plan("acme", "claude-3-5-haiku", ask(LONG, "a")), "first sight: no write premium paid"
    assert planner.plan("acme", "claude-3-5-haiku", ask(LONG, "b")) == CachePlan(("system",))
    assert not planner.plan("globex", "claude-3-5-haiku", ask(LONG, "c")), "another tenant's traffic counts apart"
    assert not planner.plan("acme", "claude-3-5-haiku", ask(SHORT, "a"))
    assert not planner.plan("acme", "claude-3-5-haiku", ask(SHORT, "b")), "below the minimum, never"
    clock.now = 1000.0
    assert not planner.plan("acme", "claude-3-5-haiku", ask(LONG, "d")), "expired: a new write would not pay back"


def test_canonical_tools_make_key_order_irrelevant() -> None:
    a = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["x"]}}}
    b = {"function": {"parameters": {"required": ["x"], "type": "object"}, "name": "f"}, "type": "function"}
    assert canonical_tools([a]) == canonical_tools([b])


async def test_simulated_provider_reads_a_repeated_long_prefix_from_cache() -> None:
    sim = SimulatedProvider(latency_scale=0)
    first = await sim.complete(model="gpt-4o-mini", messages=ask(LONG, "ticket one"), sampling=SamplingParams())
    second = await sim.complete(model="gpt-4o-mini", messages=ask(LONG, "ticket two"), sampling=SamplingParams())
    assert first.usage.cached_input_tokens == 0
    cached = second.usage.cached_input_tokens
    assert cached >= 1024 and cached % 128 == 0, "automatic caching: whole 128-token blocks past the minimum"
    total = first.usage.input_tokens
    assert abs(second.usage.input_tokens + cached - total) <= 3, "cached tokens move out of plain input"
    other = await sim.complete(model="gpt-4o", messages=ask(LONG, "ticket two"), sampling=SamplingParams())
    assert other.usage.cached_input_tokens == 0, "a provider cache is per model"
    short = [await sim.complete(model="gpt-4o-mini", messages=ask(SHORT, q), sampling=SamplingParams())
             for q in ("a", "b")]
    assert short[1].usage.cached_input_tokens == 0


async def test_simulated_explicit_breakpoints_write_then_read() -> None:
    sim = SimulatedProvider(latency_scale=0)
    plan = CachePlan(("system",))
    first = await sim.complete(model="claude-3-5-haiku", messages=ask(LONG, "x"), sampling=SamplingParams(),
                               cache_plan=plan)
    second = await sim.complete(model="claude-3-5-haiku", messages=ask(LONG, "y"), sampling=SamplingParams(),
                                cache_plan=plan)
    assert first.usage.cache_write_tokens > 1024 and first.usage.cached_input_tokens == 0
    assert second.usage.cached_input_tokens == first.usage.cache_write_tokens and second.usage.cache_write_tokens == 0


def routed(model: str = "claude-3-5-haiku", baseline: str = "claude-sonnet-4") -> RoutedRequest:
    request = LLMRequest(id="r1", tenant="acme", messages=ask(LONG, "q"))
    return RoutedRequest(request=request, routed_at=0.0,
                         route=Route(task_type="classification", tier="small", model=model, provider="anthropic",
                                     reason="test", input_tokens=2000, full_input_tokens=2000, baseline_model=baseline),
                         keys=CacheKeys(scope="s", exact="e", prefix="p", lookup_text="q", tier_rank=0))


def test_usage_chain_attributes_prompt_cache_and_reconciles_exactly() -> None:
    catalog = PriceCatalog.load()
    usage = TokenUsage(input_tokens=100, cached_input_tokens=1900, output_tokens=20)
    record = llm_usage(routed(), "claude-3-5-haiku", usage, batch=True)
    assert [s.strategy for s in record.steps] == ["routed_down", "prompt_cache", "batch_api"]
    assert record.baseline.usage.input_tokens == 2000 and record.baseline.usage.cached_input_tokens == 0
    chain = price_chain(record, catalog)
    assert chain.savings["prompt_cache"] > 0 and chain.savings["batch_api"] > 0
    assert chain.baseline - chain.actual == sum(chain.savings.values(), Decimal(0))
    data = price_usage(record, catalog)
    assert Decimal(str(data.baseline_cost_usd)) - Decimal(str(data.actual_cost_usd)) == sum(
        (Decimal(str(v)) for v in data.savings_by_strategy.values()), Decimal(0))


def test_a_cache_write_that_never_paid_back_is_a_negative_saving() -> None:
    usage = TokenUsage(input_tokens=10, cache_write_tokens=1990, output_tokens=20)
    record = llm_usage(routed(model="claude-sonnet-4"), "claude-sonnet-4", usage)
    assert [s.strategy for s in record.steps] == ["prompt_cache"]
    chain = price_chain(record, PriceCatalog.load())
    assert chain.savings["prompt_cache"] < 0, "the write premium shows as the strategy's cost"


def test_no_cache_tokens_no_prompt_cache_step() -> None:
    record = llm_usage(routed(), "claude-3-5-haiku", TokenUsage(input_tokens=2000, output_tokens=5))
    assert "prompt_cache" not in [s.strategy for s in record.steps]
