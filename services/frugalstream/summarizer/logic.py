"""Summarize a job's distinct items once, packed several per call, and fan results out to every original item.

`Summarizer.handle` runs one job part: plan it (`Planner`, persisted), re-emit what a previous delivery finished
but may not have published, then run the remaining packs, through the batch API (`Batches`) when the job may
wait that long, else a chunk of standard calls at a time (`Packs`); each call's answer is persisted the moment
it arrives (`Answers`) and each chunk's results, usage and progress are emitted before the next chunk starts.
A part that outlives the handler budget (a slow provider, a batch still running) ends as `Continues`, so the
consumer never blocks past `max_poll_interval`. A later part of a job waits (`Continues`) while an earlier
part is unfinished, so it reuses that part's answers instead of paying for the same items again.

A job's model is held to its tenant's policy like a request's (`model_for`): a pin outside `allowed_models` or
above `max_tier`, or one the price catalog cannot price (unless `allow_unpriced_models`), is refused before
anything is planned or called, and every item is answered with the error. The tenant's budgets (`llm.budgets`,
the job's tags selecting tag budgets) bind each part as it starts (`within_budget`): over a refusing budget the
part is refused the same way; a downgrading or over budget caps its model's tier as it caps a request's. A part
already under way finishes on the model it started with, so a budget overshoots by at most one part.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from frugalstream.llm.budgets import BudgetBook, budget_ceiling, refuses
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.update import catalog_file
from frugalstream.llm.providers import Provider
from frugalstream.llm.resilience import BreakerRegistry, RetryPolicy
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import TIERS, SummarizeJob, SummarizeProgress, SummaryResult
from frugalstream.summarizer.answers import Answers
from frugalstream.summarizer.batches import Batches
from frugalstream.summarizer.batching import BatchBackend
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.emit import Emitter
from frugalstream.summarizer.near import NearDuplicates
from frugalstream.summarizer.packs import Packs
from frugalstream.summarizer.plan import JobView, Plan, Planner, job_key
from frugalstream.summarizer.results import Continues, Emission, Emit, Finished, Outcome
from frugalstream.summarizer.store import NewResult, SummaryStore

__all__ = ["JobDenied", "Summarizer", "SummarizerConfig"]
log = get_logger(__name__)


class JobDenied(Exception):
    """The tenant's policy forbids running the job on its model; every item is answered with `code: message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def denied(job: SummarizeJob, denial: JobDenied) -> Emission:
    """An error result for every item of the part and a finished progress: nothing was planned or called."""
    error, run_key = f"{denial.code}: {denial}", job.run_key()
    results = tuple(SummaryResult(job_id=job.job_id, tenant=job.tenant, item_id=item.id, status="error",
                                  source="error", model=job.model, error=error, run_key=run_key)
                    for item in job.items)
    progress = SummarizeProgress(job_id=job.job_id, tenant=job.tenant, total_items=job.total_items or len(job.items),
                                 done_items=len(job.items), unique_items=0, model_calls=0, finished=True,
                                 run_key=run_key)
    return Emission(results, (), progress)


@dataclass
class Summarizer:
    """The orchestrator: decides the order of the steps; each step's work lives in its own class."""

    settings: Settings
    db: SummaryStore
    planner: Planner
    packs: Packs
    batches: Batches | None
    config: SummarizerConfig
    catalog: PriceCatalog  # a pin to a model it cannot price is refused (spend must be priceable), as for requests
    budgets: BudgetBook = field(default_factory=BudgetBook)  # fed from `llm.budgets` by the service

    @classmethod
    def build(cls, settings: Settings, provider: Provider, *, store: SummaryStore | None = None,
              batch: BatchBackend | None = None, near: NearDuplicates | None = None,
              config: SummarizerConfig | None = None, policy: RetryPolicy | None = None,
              breakers: BreakerRegistry | None = None, counter: TokenCounter | None = None,
              catalog: PriceCatalog | None = None) -> Summarizer:
        """The parts over one store (default: `summarizer.sqlite` in the state directory) and one token counter;
        the price catalog defaults to the one the settings name (with their overrides)."""
        db = store or SummaryStore(settings.state_dir / "summarizer.sqlite")
        config = config or SummarizerConfig()
        counter = counter or TokenCounter()
        answers = Answers(db, counter)
        packs = Packs(provider, answers, policy or RetryPolicy(), breakers or BreakerRegistry())
        planner = Planner(db, near or NearDuplicates(), counter, config)
        batches = Batches(batch, answers, packs, config) if batch is not None else None
        catalog = catalog or PriceCatalog.load(catalog_file(settings.price_catalog, settings.state_dir),
                                               overrides=settings.price_overrides)
        return cls(settings, db, planner, packs, batches, config, catalog)

    async def aclose(self) -> None:
        await self.packs.provider.aclose()
        if self.batches is not None:
            await self.batches.backend.aclose()
        await self.db.aclose()

    def model_for(self, job: SummarizeJob) -> str:
        """The job's pin, if the tenant's policy allows it, else the first small-tier model it allows; raises
        `JobDenied` naming the wall (the same walls `classifier.routing.choose_model` and `walls` hold a pin to)."""
        policy = self.settings.tenants.get(job.tenant, TenantPolicy())
        allowed = policy.allowed_models
        if job.model is None:
            models = [m for m in self.settings.tiers.small if allowed is None or m in allowed]
            if not models:
                raise JobDenied("policy_denied", f"no small-tier model is allowed for tenant {job.tenant!r}")
            return models[0]
        if allowed is not None and job.model not in allowed:
            raise JobDenied("policy_denied", f"model {job.model!r} is not allowed for tenant {job.tenant!r}")
        tier = self.settings.tiers.tier_of(job.model)
        if TIERS.index(tier) > TIERS.index(policy.max_tier):
            raise JobDenied("policy_denied", f"model {job.model!r} ({tier}) is above tenant {job.tenant!r}'s "
                                             f"maximum tier ({policy.max_tier})")
        if not (policy.allow_unpriced_models or self.catalog.has(job.model)):
            raise JobDenied("unpriced_model", f"model {job.model!r} has no price in the catalog "
                                              f"({self.catalog.version}); add a price override or ask for "
                                              "allow_unpriced_models")
        return job.model

    def within_budget(self, job: SummarizeJob, model: str) -> str:
        """`model`, or the first model the tenant may use at the tier its strictest budget allows; raises
        `JobDenied` when that budget refuses, or allows no model the tenant may use."""
        state = self.budgets.verdict(job.tenant, job.tags)
        if state is None:
            return model
        if refuses(state):
            raise JobDenied("budget_exceeded", f"budget {state.budget_id} is over its limit")
        ceiling = budget_ceiling(state)
        if ceiling is None or TIERS.index(self.settings.tiers.tier_of(model)) <= TIERS.index(ceiling):
            return model
        policy = self.settings.tenants.get(job.tenant, TenantPolicy())
        for tier in reversed(TIERS[:TIERS.index(ceiling) + 1]):
            for candidate in self.settings.tiers.for_tier(tier):
                allowed = policy.allowed_models is None or candidate in policy.allowed_models
                if allowed and (policy.allow_unpriced_models or self.catalog.has(candidate)):
                    log.info("summarize_job_downgraded", job_id=job.job_id, tenant=job.tenant, part=job.part,
                             budget_id=state.budget_id, model=candidate)
                    return candidate
        raise JobDenied("budget_exceeded", f"budget {state.budget_id} caps tenant {job.tenant!r} at {ceiling} "
                                           "and no model it may use is there")

    async def part_model(self, job: SummarizeJob) -> str:
        """The model for this part: a part not yet started is held to policy and budget; one under way keeps the
        model it started on (a budget's downgrade included) while the tenant's policy still allows it."""
        model = self.model_for(job)
        raw = await self.db.load_plan(job_key(job))
        if raw is None:
            return self.within_budget(job, model)
        started = Plan.from_json(raw).model
        if started is None or started == model:
            return model
        try:
            return self.model_for(job.model_copy(update={"model": started}))
        except JobDenied:
            return model  # the policy changed under the part: its own model now, not one it may no longer use

    def _free_view(self, job: SummarizeJob) -> JobView | None:
        """The part as its own model would run it, when a budget refused its spend: what the store holds for that
        model costs nothing. None when the tenant's policy refuses the model too."""
        try:
            return self._view(job, self.model_for(job))
        except JobDenied:
            return None

    def _view(self, job: SummarizeJob, model: str) -> JobView:
        return JobView.of(job, model, job.model or self.settings.default_baseline_model,
                          simulated=self.packs.provider.name == "simulated")

    async def _serve_stored(self, view: JobView, denial: JobDenied, emit: Emit) -> None:
        """A budget refuses the part's spend, not its stored summaries: those are served (call `reuse`, unpaid),
        and only the other items are refused."""
        plan = await self.planner.plan(view)  # its calls are never made: `_refuse_part` answers what they would
        if plan.reuse and not any(c.call_id == "reuse" for c in await self.db.calls(view.key)):
            await self.packs.answers.record_reuse(view, plan)
        await self._refuse_part(view.job, denial, emit, view=view)

    async def _refuse_part(self, job: SummarizeJob, denial: JobDenied, emit: Emit, *,
                           view: JobView | None = None) -> None:
        """A refused part of a job in parts is kept as a finished part of its run, its unanswered items answered
        with the error (call `refused`, unpaid): the run's progress counts it. Its own counters (no call, its
        items only, finished) made a run look finished with parts still to run, or never finished after a
        refused part, and the job report say a run that had paid for its first parts called no model.
        `view`: the part's, already planned (`_serve_stored`); else it is planned here with nothing in it."""
        plan = Plan(packs=[])
        if view is None:
            view = JobView.of(job, job.model or "", job.model or self.settings.default_baseline_model)
            await self.db.save_plan(view.key, job.job_id, job.tenant, job.part, job.parts, 0, plan.to_json(),
                                    run_key=job.run_key())
        if not any(c.call_id == "refused" for c in await self.db.calls(view.key)):
            resolved = await self.db.resolved(view.key)  # a part under way keeps what it was answered
            error = f"{denial.code}: {denial}"
            results = [NewResult(d, None, error, view.first_id(d)) for d in view.groups if d not in resolved]
            await self.db.record_call(job_key=view.key, job_id=job.job_id, tenant=job.tenant, call_id="refused",
                                      scope=view.scope, model=None, simulated=False, results=results,
                                      items=sum(len(view.groups[r.digest]) for r in results), paid=False,
                                      usage=None, actual=None)
            await self.db.finish(view.key)
        out = Emitter(self.db, view, Plan.from_json(await self.db.load_plan(view.key) or plan.to_json()))
        await out.publish([c.call_id for c in await self.db.calls(view.key) if not c.published], emit, force=True)

    async def handle(self, job: SummarizeJob, emit: Emit) -> Outcome:
        """Runs one job part as far as the handler budget allows; everything done so far has gone to `emit`."""
        started = time.monotonic()
        try:
            model = await self.part_model(job)
        except JobDenied as denial:
            log.info("summarize_job_denied", job_id=job.job_id, tenant=job.tenant, part=job.part, code=denial.code)
            free = self._free_view(job) if denial.code == "budget_exceeded" else None
            if free is None:
                await (self._refuse_part(job, denial, emit) if job.parts > 1 else emit(denied(job, denial)))
                return Finished(job)
            if job.part and await self.db.earlier_part_pending(job.run_key(), job.part):
                return Continues(job, "earlier_part")  # what it stores may answer this part's repeats for free
            await self._serve_stored(free, denial, emit)
            return Finished(job)
        if job.part and await self.db.earlier_part_pending(job.run_key(), job.part):
            return Continues(job, "earlier_part")  # its repeats may be paid by the earlier part (a running batch)
        view = self._view(job, model)
        plan = await self.planner.plan(view)
        out = Emitter(self.db, view, plan)
        calls = await self.db.calls(view.key)
        await out.publish([c.call_id for c in calls if not c.published], emit)
        if plan.reuse and not any(c.call_id == "reuse" for c in calls):
            await self.packs.answers.record_reuse(view, plan)
            await out.publish(["reuse"], emit)
        resolved = await self.db.resolved(view.key)
        pending = [(n, [d for d in p if d not in resolved]) for n, p in enumerate(plan.packs)]
        pending = [(n, ds) for n, ds in pending if ds]
        if pending and self.batches is not None and self.batches.applies(job):
            called = {c.call_id for c in calls}
            batched = [(n, ds) for n, ds in pending if f"p{n}" not in called]  # a pack the batch answered is done
            if batched:
                kept = await self.batches.run(view, plan, batched, started)
                if kept is None:
                    return Continues(job, "batch_running")
                await out.publish(kept, emit)
                resolved = await self.db.resolved(view.key)
                pending = [(n, ds) for n, p in pending if (ds := [d for d in p if d not in resolved])]
                if pending and time.monotonic() - started > self.config.handler_budget_s:
                    return Continues(job, "budget")  # the batch's leftovers, retried alone, in the next run
        size = self.config.chunk_calls
        for start in range(0, len(pending), size):
            made = await asyncio.gather(*(self.packs.run(view, plan, n, ds) for n, ds in pending[start:start + size]))
            await out.publish([c for ids in made for c in ids], emit)
            if start + size < len(pending) and time.monotonic() - started > self.config.handler_budget_s:
                return Continues(job, "budget")
        await self.db.finish(view.key)
        await out.publish([], emit, force=True)
        return Finished(job)
