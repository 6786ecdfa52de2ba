"""Summarizer service: `llm.summarize.jobs` -> `llm.summaries`, `llm.summarize.progress` and `llm.usage`;
follows `llm.budgets`.

One job part per handler call (`max_records=1`): the part's outputs are published chunk by chunk while it
runs, and a part that needs more time than the handler budget is republished to the jobs topic as a
continuation (same key, so it stays behind nothing but its own job's later parts) before its offset is
committed. Parts of one job share the job id as key, so one instance processes them in order.

A part that fails its contract (one item over the text limit fails the whole part) is dead-lettered, and when
its job id and tenant can be read its caller still gets an answer (`invalid_job_answer`): an error per item id
it names and a finished progress, instead of silence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from frugalstream.llm.embedder import AsyncEmbedder
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.providers import Provider
from frugalstream.llm.providers.openai_batch import OpenAIBatchClient
from frugalstream.resources import Resources
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher, first_errors
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, background_options, follow_state, subscribe
from frugalstream.schemas import BudgetState, SummarizeJob, SummarizeProgress, SummaryResult
from frugalstream.schemas import topics as t
from frugalstream.summarizer.batching import BatchBackend, OpenAIBatch, SimulatedBatch
from frugalstream.summarizer.logic import Summarizer
from frugalstream.summarizer.near import NearDuplicates, load_verifier
from frugalstream.summarizer.results import Continues, Emission

CONTINUATION_HEADER = "x-frugal-continuation"
_MAX_ROUND_DIGITS = 9  # far beyond any real count; more is garbage (and int() refuses 4,300+ digits)
log = get_logger(__name__)
# SummarizeJob's own limits on the fields an invalid part is answered by.
MAX_JOB_ID_CHARS = MAX_TENANT_CHARS = 128
MAX_ITEM_ID_CHARS = 256
MAX_DETAIL_CHARS = 1_500
# Past this many times the size limit the bytes are not parsed at all (the broker's own limit stops such values).
PARSE_LIMIT_FACTOR = 16


def _name(value: object, limit: int) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _describe(exc: Exception) -> str:
    """Field paths and error types of a validation error, never a value (values are item text)."""
    if isinstance(exc, ValidationError):
        # A part is over 5 characters with its "; ", so these fill the detail (`first_errors`: `errors()` built
        # every error of a part of 100,000 bad items, holding the GIL for seconds).
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['type']}"
                         for e in first_errors(exc, MAX_DETAIL_CHARS // 4 + 2))
    else:
        text = type(exc).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def _run_key(doc: dict[str, Any]) -> str | None:
    """The run of an undecodable part, which its answers must carry (the backfill follower drops any other): the
    part's own when only its size failed it; for a part of a job in parts, whose run leaves out the items and the
    part number, also when an item fails it (the other fields are checked with one stand-in item); else None."""
    for candidate in (doc, {**doc, "items": [{"id": "-", "text": ""}], "part": 0}):
        try:
            job = SummarizeJob.model_validate(candidate)
        except ValidationError:
            continue
        if candidate is doc or job.parts > 1:
            return job.run_key()
    return None


def invalid_job_answer(raw: bytes | None, exc: Exception, max_bytes: int) -> Emission | None:
    """For the raw value of an undecodable job part: an error result for every item id it names and a finished
    progress, or None when no job id and tenant can be read from it. Read leniently: a JSON object with a string
    `job_id` and `tenant` of sane length; items without a usable `id` are skipped."""
    if raw is None or len(raw) > max_bytes * PARSE_LIMIT_FACTOR:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    job_id, tenant = _name(doc.get("job_id"), MAX_JOB_ID_CHARS), _name(doc.get("tenant"), MAX_TENANT_CHARS)
    if job_id is None or tenant is None:
        return None
    items = doc.get("items")
    ids = [i for i in (_name(it.get("id"), MAX_ITEM_ID_CHARS) for it in items if isinstance(it, dict))
           if i is not None] if isinstance(items, list) else []
    if len(raw) > max_bytes:
        error = f"too_large: job part of {len(raw)} bytes exceeds the {max_bytes}-byte limit"
    else:
        error = f"invalid_job: job part does not match the llm.summarize.jobs contract: {_describe(exc)}"
    total = doc.get("total_items")
    total = total if isinstance(total, int) and not isinstance(total, bool) and total >= len(ids) else len(ids)
    run_key = _run_key(doc)
    log.info("invalid_summarize_job_answered", job_id=job_id, tenant=tenant, items=len(ids), run_key=run_key)
    results = tuple(SummaryResult(job_id=job_id, tenant=tenant, item_id=i, status="error", source="error",
                                  error=error, run_key=run_key) for i in ids)
    progress = SummarizeProgress(job_id=job_id, tenant=tenant, total_items=total, done_items=len(ids),
                                 unique_items=0, model_calls=0, finished=True, run_key=run_key)
    return Emission(results, (), progress)


def outs_of(emission: Emission) -> list[Out]:
    """Results and progress are keyed by job id (one partition keeps a job's story in order); usage by tenant."""
    outs = [Out(t.SUMMARIES, r, key=r.job_id) for r in emission.summaries]
    outs += [Out(t.USAGE, u, key=u.tenant) for u in emission.usage]
    return [*outs, Out(t.SUMMARIZE_PROGRESS, emission.progress, key=emission.progress.job_id)]


def rounds_of(decoded: Decoded[SummarizeJob]) -> int:
    """How many times the part was continued already. The header is the stage's own bookkeeping, never the job:
    a value a producer garbled (copied headers, a retry tool) counts as 0, logged, and never drops the part."""
    raw = dict(decoded.record.headers).get(CONTINUATION_HEADER) or b""
    if not raw:
        return 0
    if raw.isdigit() and len(raw) <= _MAX_ROUND_DIGITS:
        return int(raw)
    log.warning("summarize_continuation_header_invalid", job_id=decoded.value.job_id, part=decoded.value.part,
                value=raw[:40].decode("ascii", "backslashreplace"))
    return 0


def continuation(decoded: Decoded[SummarizeJob], rounds: int | None = None) -> Out:
    """The same part again on the jobs topic, behind nothing but its own job's later parts (same key).
    `rounds`: as read (by `rounds_of`) before the part ran; read from the header when not given."""
    job = decoded.value
    done = rounds_of(decoded) if rounds is None else rounds
    return Out(t.SUMMARIZE_JOBS, job, key=job.job_id, headers={CONTINUATION_HEADER: str(done + 1)})


@dataclass
class SummarizerService:
    settings: Settings
    logic: Summarizer
    name: str = "summarizer"
    publisher: Publisher | None = field(default=None, repr=False)
    busy_s: float = 0.0  # time spent inside the handler: benches report it apart from the broker's share

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.logic.aclose()

    async def _emit(self, emission: Emission) -> None:
        if self.publisher is None:
            raise RuntimeError("summarizer is not registered with a broker")
        await self.publisher.publish_all(outs_of(emission))

    async def _on_jobs(self, batch: Sequence[Decoded[SummarizeJob]], _ctx: BatchContext) -> list[Out]:
        continuations: list[Out] = []
        started = time.perf_counter()
        try:
            for decoded in batch:
                # Read before the part runs: nothing about the header may fail it after its outputs are out.
                rounds = rounds_of(decoded)
                outcome = await self.logic.handle(decoded.value, self._emit)
                if isinstance(outcome, Continues):
                    out = continuation(decoded, rounds)
                    log.info("summarize_job_continues", job_id=outcome.job.job_id, part=outcome.job.part,
                             round=rounds + 1, why=outcome.why)
                    continuations.append(out)
        finally:
            self.busy_s += time.perf_counter() - started
        return continuations

    def _on_invalid(self, record: Record, exc: Exception) -> list[Out]:
        """An undecodable part that names its job and tenant is answered per item (it is dead-lettered too)."""
        answer = invalid_job_answer(record.value, exc, self.settings.max_message_bytes)
        return [] if answer is None else outs_of(answer)

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        self.publisher = publisher
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.SUMMARIZE_JOBS, model=SummarizeJob,
                  process=self._on_jobs, max_records=1, on_invalid=self._on_invalid, **background_options())
        # Budgets bind backfill parts as they bind requests: every instance reads the compacted topic whole.
        follow_state(broker, publisher, self.settings, service=f"{self.name}.budgets", topic=t.BUDGETS,
                     model=BudgetState, update=self.logic.budgets.update)


def build_summarizer(settings: Settings, provider: Provider,
                     embedder_factory: Callable[[], AsyncEmbedder] | None = None,
                     catalog: PriceCatalog | None = None) -> Summarizer:
    """The batch backend follows the provider: OpenAI's Batch API, an emulation for `simulated`, else none."""
    batch: BatchBackend | None = None
    if settings.provider == "openai":
        key = settings.secret(settings.openai_api_key, settings.openai_api_key_file)
        batch = OpenAIBatch(OpenAIBatchClient(base_url=settings.openai_base_url, api_key=key))
    elif settings.provider == "simulated":
        batch = SimulatedBatch(provider)
    near = NearDuplicates(embedder_factory=embedder_factory, verifier=load_verifier())
    return Summarizer.build(settings, provider, batch=batch, near=near, catalog=catalog)


def wire(res: Resources) -> SummarizerService:
    s = res.settings
    return SummarizerService(s, build_summarizer(s, res.provider(s.provider), lambda: res.embedder, res.catalog))
