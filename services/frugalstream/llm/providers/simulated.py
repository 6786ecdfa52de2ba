"""A deterministic stand-in provider for demos, benchmarks and tests.

Answers are derived from a hash of model + messages, so a replayed workload produces byte-identical
answers and costs, and every answer starts with "[simulated <model>]" so it can never pass for a real one.
Output lengths follow the task the prompt looks like (short for FAQ and labels, long for drafting and code)
and latency follows model size, so routing and caching savings in a demo have realistic proportions.
A prompt that asks for packed sections (several items, one `### <id>` section each) is answered in that
format, one deterministic summary per item, as a model that follows format instructions would.

Usage decision: counted with tiktoken but reported as provider usage (`estimated=False`). In a simulation
the simulator *is* the biller, so these counts are exact by definition; what is not real is the whole
answer, and `Completion.simulated` (echoed on every response, usage record and cost event) says so.
`estimated=True` stays reserved for "a real provider did not tell us", which the estimate-rate metric
measures. `usage_estimated=True` flips it for tests of that path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from frugalstream.llm.prompt_cache import CachePlan
from frugalstream.llm.providers.base import Completion, ErrorKind, ProviderError
from frugalstream.llm.providers.simulated_cache import SimulatedPromptCache
from frugalstream.llm.tokens import TokenCounter
from frugalstream.schemas import ChatMessage, SamplingParams, TokenUsage, ToolCall
from frugalstream.schemas.requests import ToolChoice

# (base latency ms, ms per output token) by model size, roughly what hosted APIs show at low load.
_LATENCY = {"small": (150.0, 5.0), "mid": (300.0, 12.0), "large": (600.0, 25.0)}
# Typical output token range by task type; larger models are a bit more verbose.
_OUTPUT_RANGE = {
    "classification": (2, 8), "faq": (25, 70), "extraction": (20, 90), "chat": (40, 150),
    "summarization": (60, 220), "reasoning": (150, 500), "drafting": (200, 500), "code": (150, 600),
    "creative": (200, 600),
}
_VERBOSITY = {"small": 1.0, "mid": 1.15, "large": 1.3}
_SMALL_HINTS = ("mini", "nano", "small", "haiku", "flash", "lite", "tiny", "1b", "3b", "7b", "8b")
_LARGE_HINTS = ("large", "opus", "70b", "72b", "405b", "gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "pro")
_TASK_HINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("code", ("```", "def ", "function", "python", "javascript", "sql", "implement", "refactor", "bug")),
    ("summarization", ("summarize", "summarise", "summary", "tl;dr", "key points")),
    ("classification", ("classify", "categorize", "sentiment", "label", "which category")),
    ("extraction", ("extract", "as json", "fields", "parse")),
    ("drafting", ("write", "draft", "email", "letter", "blog", "essay", "rewrite", "compose")),
    ("creative", ("story", "poem", "lyrics", "slogan")),
    ("reasoning", ("prove", "step by step", "why does", "calculate", "plan ")),
)
_FILLER = (
    "the service answers this request with a simulated reply that has a realistic length for its task "
    "and costs tokens like a real model would so routing caching and batching savings can be measured "
    "without calling any provider customers orders account policy product shipping refund support team "
    "please note that details depend on configuration data and context for example results summary"
)
_WORDS = tuple(_FILLER.split())
# Packed prompts (several items per call): the system prompt asks for "one section per item", each item
# starts with a header line "### <id>", and may cap each section ("under N tokens"). The summarizer writes
# them; matching them here keeps the simulator a plain follower of format instructions, not a summarizer import.
_PACKED_HINT = "one section per item"
_HEADER = re.compile(r"^###[ \t]+(\S+)[ \t]*$", re.MULTILINE)
_SECTION_LIMIT = re.compile(r"under (\d+) tokens")


def model_size(model: str) -> str:
    """Guess small/mid/large from the model name; unknown names are mid."""
    m = model.lower().split("/")[-1]
    if any(h in m for h in _SMALL_HINTS):
        return "small"
    if any(h in m for h in _LARGE_HINTS):
        return "large"
    return "mid"


def guess_task(messages: Sequence[ChatMessage]) -> str:
    """The task the last user turn looks like; short questions read as FAQ, anything else as chat."""
    last = next((m.content for m in reversed(messages) if m.role == "user"), "")
    text = last.lower()
    for task, hints in _TASK_HINTS:
        if any(h in text for h in hints):
            return task
    return "faq" if len(text) < 200 and text.rstrip().endswith("?") else "chat"


def packed_items(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]], int | None] | None:
    """(instruction, [(id, text)], per-section token cap) when the prompt asks for packed sections, else None."""
    system = " ".join(m.content for m in messages if m.role == "system")
    if _PACKED_HINT not in system.lower():
        return None
    user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    marks = list(_HEADER.finditer(user))
    if not marks:
        return None
    items = [(m.group(1), user[m.end():marks[n + 1].start() if n + 1 < len(marks) else len(user)].strip())
             for n, m in enumerate(marks)]
    limit = _SECTION_LIMIT.search(system)
    return user[:marks[0].start()].strip(), items, int(limit.group(1)) if limit else None


_PLACEHOLDER: dict[str, object] = {"string": "simulated", "integer": 1, "number": 1, "boolean": True,
                                   "array": [], "object": {}}


def forced_tool_call(tools: Sequence[Mapping[str, Any]], choice: ToolChoice | None, digest: bytes) -> ToolCall | None:
    """The call a model must make when `tool_choice` forces one (`required`, or a named function), with a
    placeholder for each required argument; None otherwise: under `auto` the simulator answers in text, as
    the demo workload expects."""
    names = [t["function"]["name"] for t in tools
             if t.get("type") == "function" and isinstance(t.get("function"), Mapping)]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    elif choice == "required" and names:
        name = names[0]
    else:
        return None
    spec: Mapping[str, Any] = next((t["function"] for t in tools if isinstance(t.get("function"), Mapping)
                 and t["function"].get("name") == name), {})
    params = spec.get("parameters") or {}
    props = params.get("properties") or {}
    args = {k: _PLACEHOLDER.get(str(props.get(k, {}).get("type")), "simulated") for k in params.get("required", [])}
    return ToolCall(id=f"call_{digest[:6].hex()}", name=name, arguments=json.dumps(args, separators=(",", ":")))


def request_digest(model: str, messages: Sequence[ChatMessage]) -> bytes:
    # `parts` is left out when absent, so digests (and answers) of plain-text turns are what they always were.
    canonical = json.dumps([model, [m.model_dump(mode="json", exclude={"parts"} if m.parts is None else None)
                                    for m in messages]], sort_keys=True)
    return hashlib.sha256(canonical.encode()).digest()


class SimulatedProvider:
    """Deterministic answers, realistic token counts and latency; named as simulated in every answer.

    `latency_scale` multiplies the simulated latency (0 for unit tests, 0.01 for benchmarks). Faults for
    tests: `fail_rate` fails that fraction of (model, messages) pairs *every* time (exercises fallback), and
    `transient_failures` fails the first N calls of each pair and then succeeds (exercises retry).
    """

    def __init__(
        self,
        *,
        latency_scale: float = 1.0,
        fail_rate: float = 0.0,
        transient_failures: int = 0,
        fail_kind: ErrorKind = "server",
        retry_after_s: float | None = None,
        usage_estimated: bool = False,
        token_counter: TokenCounter | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        name: str = "simulated",
        prompt_cache: bool = True,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be within [0, 1]")
        self.name = name
        self._latency_scale = latency_scale
        self._fail_rate = fail_rate
        self._transient_failures = transient_failures
        self._fail_kind: ErrorKind = fail_kind
        self._retry_after_s = retry_after_s
        self._usage_estimated = usage_estimated
        self._counter = token_counter or TokenCounter()
        self._sleep = sleep
        self._calls: Counter[bytes] = Counter()
        # Cached-input accounting of repeated prefixes, as providers bill it (see simulated_cache).
        self.prompt_cache = SimulatedPromptCache(self._counter) if prompt_cache else None

    def _maybe_fail(self, model: str, digest: bytes) -> None:
        failing = int.from_bytes(digest[-4:], "big") / 2**32 < self._fail_rate
        if self._transient_failures and not failing:  # counted only when asked, so long runs do not grow it
            self._calls[digest] += 1
            failing = self._calls[digest] <= self._transient_failures
        if failing:
            status = {"rate_limited": 429, "server": 503, "client": 400, "timeout": 408}.get(self._fail_kind)
            raise ProviderError(f"{self.name} injected {self._fail_kind} for {model}", kind=self._fail_kind,
                                status=status, retry_after_s=self._retry_after_s)

    def _content(self, model: str, task: str, target: int, rng: random.Random,
                 response_format: Mapping[str, Any] | None) -> str:
        words = [rng.choice(_WORDS) for _ in range(max(1, target))]
        body = " ".join(words)
        if response_format and response_format.get("type") in ("json_object", "json_schema"):
            return json.dumps({"simulated": True, "model": model, "task": task, "answer": body})
        return f"[simulated {model}] {body}"

    def _packed_content(self, model: str, instruction: str, items: list[tuple[str, str]], limit: int | None) -> str:
        """One section per item; each section depends only on (model, instruction, item text), so an item
        gets the same summary whichever pack it lands in, and a cap in the prompt is respected."""
        low, high = _OUTPUT_RANGE["summarization"]
        sections = []
        for local, text in items:
            key = json.dumps([model, instruction, " ".join(text.lower().split())]).encode()
            rng = random.Random(hashlib.sha256(key).digest())
            target = round(rng.randint(low, high) * _VERBOSITY[model_size(model)])
            summary = f"[simulated {model}] " + " ".join(rng.choice(_WORDS) for _ in range(max(1, target)))
            if limit is not None and self._counter.count_text(summary, model) > limit:
                summary = self._fit(summary, model, limit)
            sections.append(f"### {local}\n{summary}")
        return "\n".join(sections)

    def _fit(self, text: str, model: str, limit: int) -> str:
        """Longest word prefix of `text` within `limit` tokens (binary search), so max_tokens is honoured."""
        words = text.split(" ")
        low, high = 0, len(words)
        while low < high:
            mid = (low + high + 1) // 2
            if self._counter.count_text(" ".join(words[:mid]), model) <= limit:
                low = mid
            else:
                high = mid - 1
        return " ".join(words[:low])

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] = (),
        response_format: Mapping[str, Any] | None = None,
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool | None = None,
        cache_plan: CachePlan | None = None,
    ) -> Completion:
        digest = request_digest(model, messages)
        self._maybe_fail(model, digest)
        if tools and (call := forced_tool_call(tools, tool_choice, digest)) is not None:
            return self._tool_answer(model, messages, tools, call)
        rng = random.Random(digest)
        size = model_size(model)
        task = guess_task(messages)
        low, high = _OUTPUT_RANGE[task]
        target = round(rng.randint(low, high) * _VERBOSITY[size])
        packed = packed_items(messages) if response_format is None else None
        if packed is not None:
            content = self._packed_content(model, *packed)
        else:
            content = self._content(model, task, target, rng, response_format)
        finish = "stop"
        if max_tokens is not None and self._counter.count_text(content, model) > max_tokens:
            content, finish = self._fit(content, model, max_tokens), "length"
        output_tokens = self._counter.count_text(content, model)
        input_tokens = self._counter.count_messages(messages, model)
        if tools:
            input_tokens += self._counter.count_text(json.dumps(list(tools), separators=(",", ":")), model)
        cached = written = 0
        if self.prompt_cache is not None:
            bill = self.prompt_cache.bill(model, messages, tools, input_tokens, cache_plan)
            cached, written = bill.cached, bill.written
        base_ms, per_token_ms = _LATENCY[size]
        latency_ms = (base_ms + per_token_ms * output_tokens) * self._latency_scale
        if latency_ms > 0:
            await self._sleep(latency_ms / 1000)
        return Completion(
            content=content,
            model=model,
            usage=TokenUsage(input_tokens=input_tokens - cached - written, cached_input_tokens=cached,
                             cache_write_tokens=written, output_tokens=output_tokens,
                             estimated=self._usage_estimated),
            finish_reason=finish,
            latency_ms=latency_ms,
            simulated=True,
            reported_model=model,
        )

    def _tool_answer(self, model: str, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]],
                     call: ToolCall) -> Completion:
        output = self._counter.count_text(call.name, model) + self._counter.count_text(call.arguments, model) + 3
        tools_tokens = self._counter.count_text(json.dumps(list(tools), separators=(",", ":")), model)
        return Completion(
            content="", model=model, finish_reason="tool_calls", latency_ms=0.0, simulated=True,
            usage=TokenUsage(input_tokens=self._counter.count_messages(messages, model) + tools_tokens,
                             output_tokens=output, estimated=self._usage_estimated),
            tool_calls=(call,), reported_model=model,
        )

    async def aclose(self) -> None:
        self._calls.clear()
