"""A job part's plan: which content is reused from the store, which merges into a near-duplicate, and which
distinct items go into which packed call; `Planner` makes it.

The plan is persisted before the first call, so a redelivered job rebuilds exactly the same calls (same
packs, same deterministic usage ids) and skips the ones the store says are done.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from frugalstream.llm.cache_keys import normalize_text
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.logging import get_logger
from frugalstream.schemas import SummarizeJob
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.near import NearDuplicates
from frugalstream.summarizer.packing import HEADER_TOKENS, pack
from frugalstream.summarizer.store import SummaryStore

# pack-v2: item text is escaped in packed prompts, and only a summary made for a text is stored as its summary.
# Rows kept under pack-v1 may hold a summary another item's text wrote (a fake `### <id>` line) or one borrowed
# from a near-duplicate; neither can be told from a real one, so none of them is reused.
# pack-v3: a header behind invisible characters (`\u200b### 2`) is escaped too; pack-v2 rows may hold a summary
# such a line wrote, so they are not reused either.
PROMPT_VERSION = "pack-v3"
log = get_logger(__name__)


def content_hash(text: str) -> str:
    return hashlib.blake2b(normalize_text(text).encode(), digest_size=12).hexdigest()


def job_key(job: SummarizeJob) -> str:
    """Identifies this exact part: a producer reusing a job id with other content gets a new key."""
    return hashlib.blake2b(job.model_dump_json().encode(), digest_size=12).hexdigest()


def reuse_scope(tenant: str, instruction: str, max_output_tokens: int, model: str, *, simulated: bool = True) -> str:
    """A summary is reused only for the same tenant, instruction, output budget, model, prompt version and kind of
    provider: the simulated provider's placeholder text is never served to a real provider's job (`frugalstream
    dev`, then a real provider on the same state directory). The default is the safe side: a caller that omits
    it can only miss a real summary, never serve a simulated one as real."""
    payload = json.dumps([tenant, instruction, max_output_tokens, model, PROMPT_VERSION, simulated])
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


@dataclass
class Plan:
    packs: list[list[str]]
    reuse: dict[str, tuple[str, str]] = field(default_factory=dict)  # digest -> (item id, job id) stored
    near: dict[str, str] = field(default_factory=dict)  # member digest -> representative digest
    model: str | None = None  # the model the part started on (None: planned before it was recorded)

    def to_json(self) -> dict[str, Any]:
        return {"packs": self.packs, "reuse": {d: list(v) for d, v in self.reuse.items()}, "near": self.near,
                "model": self.model}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        model = data.get("model")
        return cls(packs=[list(p) for p in data["packs"]],
                   reuse={d: (str(v[0]), str(v[1])) for d, v in data["reuse"].items()}, near=dict(data["near"]),
                   model=model if isinstance(model, str) else None)

    def members(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for member, rep in self.near.items():
            out.setdefault(rep, []).append(member)
        return out


@dataclass
class JobView:
    """The job grouped by content: digest -> indices of the original items, in first-seen order."""

    job: SummarizeJob
    key: str
    scope: str
    model: str
    baseline: str
    groups: dict[str, list[int]]

    @classmethod
    def of(cls, job: SummarizeJob, model: str, baseline: str, *, simulated: bool = True) -> JobView:
        """`simulated`: the provider is the simulated one (see `reuse_scope`)."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(job.items):
            groups.setdefault(content_hash(item.text), []).append(i)
        scope = reuse_scope(job.tenant, job.instruction, job.max_output_tokens, model, simulated=simulated)
        return cls(job, job_key(job), scope, model, baseline, groups)

    def text(self, digest: str) -> str:
        return self.job.items[self.groups[digest][0]].text

    def first_id(self, digest: str) -> str:
        return self.job.items[self.groups[digest][0]].id

    @property
    def total_items(self) -> int:
        return self.job.total_items or len(self.job.items)


@dataclass
class Planner:
    """Decides, once per job part, what is reused, what merges into a near-duplicate, and what is paid for."""

    db: SummaryStore
    near: NearDuplicates = field(default_factory=NearDuplicates)
    counter: TokenCounter = field(default_factory=TokenCounter)
    config: SummarizerConfig = field(default_factory=SummarizerConfig)

    async def plan(self, view: JobView) -> Plan:
        """The persisted plan of a redelivered part, else a new one, persisted before any call is made."""
        raw = await self.db.load_plan(view.key)
        return Plan.from_json(raw) if raw is not None else await self._make(view)

    async def _make(self, view: JobView) -> Plan:
        job = view.job
        ids = Counter(item.id for item in job.items)
        if len(ids) < len(job.items):  # results are keyed by item id: a repeated id's results collide downstream
            log.warning("summarize_job_repeats_item_ids", job_id=job.job_id, tenant=job.tenant, part=job.part,
                        repeated=sorted(i for i, n in ids.items() if n > 1)[:10])
        digests = list(view.groups)
        stored = await self.db.lookup(view.scope, digests)
        reuse = {d: (stored[d].item_id, stored[d].job_id) for d in digests if d in stored}
        rest = [d for d in digests if d not in reuse]
        near = await self.near.representatives({d: view.text(d) for d in rest}) if job.near_duplicates else {}
        paid = [d for d in rest if d not in near]
        sizes = self.counter.count_texts([view.text(d) for d in paid], view.model)
        packs = pack([(d, n + HEADER_TOKENS) for d, n in zip(paid, sizes, strict=True)],
                     max_tokens=self.config.pack_tokens, max_items=self.config.pack_items)
        plan = Plan(packs=packs, reuse=reuse, near=near, model=view.model)
        earlier = await self.db.job_digests(job.run_key())
        await self.db.save_plan(view.key, job.job_id, job.tenant, job.part, job.parts,
                                sum(1 for d in digests if d not in earlier), plan.to_json(), run_key=job.run_key())
        return plan
