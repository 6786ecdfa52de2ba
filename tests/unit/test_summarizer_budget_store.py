"""A refusing budget refuses a backfill's spend, not the summaries its store already holds: over it, a part's
items summarized before (for the same instruction and model) are served from the store, unpaid, and only the
others are answered `budget_exceeded`. A later part first waits for an earlier part of its run still under way,
whose summaries may answer its repeats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from frugalstream.schemas import SummarizeItem, SummaryResult, UsageRecord
from frugalstream.summarizer.app import outs_of
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.results import Continues, Emission, Finished
from frugalstream.tools.backfill import split_job
from tests.unit.test_summarizer_budgets import budget, make
from tests.unit.test_summarizer_walls import Asked, job, results, run


async def test_over_a_refusing_budget_stored_summaries_are_served_and_only_the_rest_refused(tmp_path: Path) -> None:
    provider = Asked()
    first = results(await run(make(tmp_path, provider), job()))  # a and b, paid and stored
    assert {r.status for r in first.values()} == {"ok"} and len(provider.models) == 1
    again = job(job_id="j2").model_copy(update={"items": (
        SummarizeItem(id="a2", text="Oak dining table with six seats"), SummarizeItem(id="c", text="Blue mug"))})
    outs = await run(make(tmp_path, provider, budget("over", "refuse")), again)
    got = results(outs)
    assert len(provider.models) == 1, "nothing more was paid for"
    assert (got["a2"].status, got["a2"].summary, got["a2"].source) == ("ok", first["a"].summary, "reused")
    assert got["c"].status == "error" and (got["c"].error or "").startswith("budget_exceeded: ")
    usage = [o for o in outs if isinstance(o, UsageRecord) and o.request_id.startswith("j2")]
    assert [(u.source, u.items) for u in usage] == [("cache_exact", 1)], "accounted as a store answer"
    redelivered = results(await run(make(tmp_path, provider), again))  # the budget has rolled over since
    assert len(provider.models) == 1 and not [r for r in redelivered.values() if r.status == "ok"], \
        "a part is answered once: redelivered, it pays for nothing and answers nothing again"


async def test_a_refused_part_waits_for_its_runs_earlier_part_and_takes_its_repeats_from_the_store(
        tmp_path: Path) -> None:
    provider = Asked()
    one_call_a_run = SummarizerConfig(pack_items=1, chunk_calls=1, handler_budget_s=0.0)
    logic = make(tmp_path, provider, config=one_call_a_run)
    texts = ["Oak table", "Red kettle", "Oak table", "Blue mug"]
    part0, part1 = split_job("nightly", "acme", "Summarize.", [SummarizeItem(id=str(n), text=x)
                                                               for n, x in enumerate(texts)], part_items=2)
    emitted: list[Any] = []

    async def collect(emission: Emission) -> None:
        emitted.extend(o.value for o in outs_of(emission))

    try:
        assert isinstance(await logic.handle(part0, collect), Continues)  # one of its two calls made
        logic.budgets.update(budget("over", "refuse"))
        assert await logic.handle(part1, collect) == Continues(part1, "earlier_part")
        while not isinstance(await logic.handle(part0, collect), Finished):  # under way: it finishes as planned
            pass
        assert isinstance(await logic.handle(part1, collect), Finished)
    finally:
        await logic.db.aclose()
    got = {r.item_id: r for r in emitted if isinstance(r, SummaryResult)}
    assert len(provider.models) == 2, "part 1 paid for nothing"
    assert got["2"].status == "ok" and got["2"].summary == got["0"].summary
    assert got["3"].status == "error" and (got["3"].error or "").startswith("budget_exceeded: ")
