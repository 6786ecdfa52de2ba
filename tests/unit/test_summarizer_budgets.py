"""A tenant's budgets bind its backfills as they bind its requests: a part that starts under a refusing budget that
is over is answered `budget_exceeded` without a model call (what its store holds is served: see
test_summarizer_budget_store); a downgrading (or any over) budget moves the part to a
cheaper model the tenant may use; tag budgets bind only jobs with that tag. A part under way finishes on the model
it started on, so a budget that changes mid-part neither re-prices nor strands what was planned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from frugalstream.llm.budgets import BudgetBook
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import BudgetState, SummarizeItem, SummarizeJob, SummaryResult
from frugalstream.schemas import topics as t
from frugalstream.summarizer.app import SummarizerService
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.logic import Summarizer
from frugalstream.summarizer.results import Continues, Emission, Finished
from frugalstream.summarizer.store import SummaryStore
from tests.scenarios import today
from tests.unit.test_pipeline_inmemory import InMemoryCluster
from tests.unit.test_summarizer_walls import Asked, assert_refused, job, results, run


def budget(status: str, action: str, tag: str | None = None, tenant: str = "acme") -> BudgetState:
    return BudgetState.model_validate({
        "budget_id": f"{tenant}/{tag or '*'}/day", "tenant": tenant, "tag": tag, "period": "day",
        "period_start": f"{today()}T00:00:00Z", "limit_usd": 1.0, "spent_usd": 2.0 if status == "over" else 0.9,
        "status": status, "action": action, "updated_at": 1.0})


def make(tmp: Path, provider: Any, *states: BudgetState, config: SummarizerConfig | None = None,
         **settings: Any) -> Summarizer:
    s = Settings(state_dir=tmp, simulated_latency_scale=0.0, **settings)
    logic = Summarizer.build(s, provider, store=SummaryStore(tmp / "s.sqlite"), config=config)
    for state in states:
        logic.budgets.update(state)
    return logic


def tagged(model: str | None = None, **tags: str) -> SummarizeJob:
    return job(model).model_copy(update={"tags": tags})


async def test_an_over_refusing_budget_refuses_a_backfill_before_any_call(tmp_path: Path) -> None:
    provider = Asked()
    outs = await run(make(tmp_path, provider, budget("over", "refuse")), job())
    assert_refused(outs, "budget_exceeded", provider)


async def test_a_tag_budget_binds_only_the_jobs_carrying_its_tag(tmp_path: Path) -> None:
    provider = Asked()
    refused = await run(make(tmp_path / "a", provider, budget("over", "refuse", "team=ads")), tagged(team="ads"))
    assert_refused(refused, "budget_exceeded", provider)
    other = results(await run(make(tmp_path / "b", provider, budget("over", "refuse", "team=ads")),
                              tagged(team="search")))
    assert {r.status for r in other.values()} == {"ok"} and provider.models == ["gpt-4o-mini"]


async def test_a_near_refusing_budget_and_another_tenants_budget_change_nothing(tmp_path: Path) -> None:
    provider = Asked()
    await run(make(tmp_path / "a", provider, budget("near", "refuse")), job("gpt-4o"))
    await run(make(tmp_path / "b", provider, budget("over", "refuse", tenant="globex")), job("gpt-4o"))
    assert provider.models == ["gpt-4o", "gpt-4o"]


async def test_a_downgrading_budget_moves_a_pinned_large_job_to_the_tier_it_allows(tmp_path: Path) -> None:
    provider = Asked()
    near = results(await run(make(tmp_path / "near", provider, budget("near", "downgrade")), job("gpt-4o")))
    over = results(await run(make(tmp_path / "over", provider, budget("over", "downgrade")), job("gpt-4o")))
    settings = Settings()
    assert provider.models == [settings.tiers.mid[0], settings.tiers.small[0]]
    assert {r.model for r in near.values()} == {settings.tiers.mid[0]}
    assert {r.model for r in over.values()} == {settings.tiers.small[0]}


async def test_a_downgrade_picks_a_model_the_tenant_may_use_or_refuses(tmp_path: Path) -> None:
    provider = Asked()
    nano = {"acme": TenantPolicy(allowed_models=("gpt-4.1-nano", "gpt-4o"))}
    await run(make(tmp_path / "a", provider, budget("over", "none"), tenants=nano), job("gpt-4o"))
    assert provider.models == ["gpt-4.1-nano"]  # not tiers.small[0], which the tenant may not use
    large_only = {"acme": TenantPolicy(allowed_models=("gpt-4o",))}
    outs = await run(make(tmp_path / "b", Asked(), budget("over", "none"), tenants=large_only), job("gpt-4o"))
    assert {(r.error or "").split(":")[0] for r in results(outs).values()} == {"budget_exceeded"}


async def test_a_part_under_way_finishes_on_the_model_it_started_on(tmp_path: Path) -> None:
    """One call per handler run (one item a pack, the handler budget spent at once): the part continues after
    its first call, and the budget changes in between."""
    provider = Asked()
    slow = SummarizerConfig(pack_items=1, chunk_calls=1, handler_budget_s=0.0)
    logic = make(tmp_path, provider, budget("near", "downgrade"), config=slow)
    emitted: list[Any] = []

    async def collect(emission: Emission) -> None:
        emitted.extend(emission.summaries)

    part = job("gpt-4o")
    assert isinstance(await logic.handle(part, collect), Continues)
    logic.budgets = BudgetBook()  # the budget's period ends: the pin would be allowed again
    assert isinstance(await logic.handle(part, collect), Finished)
    await logic.db.aclose()
    mid = Settings().tiers.mid[0]
    assert provider.models == [mid, mid]
    assert {r.model for r in emitted if isinstance(r, SummaryResult)} == {mid}


async def test_a_part_under_way_also_finishes_when_the_budget_turns_to_refuse(tmp_path: Path) -> None:
    provider = Asked()
    slow = SummarizerConfig(pack_items=1, chunk_calls=1, handler_budget_s=0.0)
    logic = make(tmp_path, provider, config=slow)
    statuses: list[str] = []

    async def collect(emission: Emission) -> None:
        statuses.extend(r.status for r in emission.summaries)

    part = job()
    assert isinstance(await logic.handle(part, collect), Continues)
    logic.budgets.update(budget("over", "refuse"))
    assert isinstance(await logic.handle(part, collect), Finished)
    await logic.db.aclose()
    assert statuses == ["ok", "ok"] and len(provider.models) == 2
    later = part.model_copy(update={"job_id": "j2"})
    outs = await run(make(tmp_path / "next", provider, budget("over", "refuse"), config=slow), later)
    assert {r.status for r in results(outs).values()} == {"error"} and len(provider.models) == 2  # not started


async def test_the_summarizer_service_reads_llm_budgets(pipeline: RunningServices) -> None:
    cluster = InMemoryCluster(pipeline)
    await pipeline.broker.start()
    await cluster.produce(t.BUDGETS, budget("over", "refuse").model_dump_json().encode(), key=b"acme/*/day")
    items = (SummarizeItem(id="a", text="Oak dining table with six seats"),)
    backfill = SummarizeJob(job_id="jb", tenant="acme", instruction="Summarize.", items=items)
    await cluster.produce(t.SUMMARIZE_JOBS, backfill.model_dump_json().encode(), key=b"jb")
    [raw] = await cluster.records([t.SUMMARIES], 1)
    result = SummaryResult.model_validate_json(raw)
    assert result.status == "error" and (result.error or "").startswith("budget_exceeded: ")
    service = next(s for s in pipeline.services if isinstance(s, SummarizerService))
    assert service.logic.budgets.verdict("acme", {}) is not None
