"""Round 4 of the classifier's hostile review: records built to cost the classifier seconds of CPU or its memory.

A history of parallel tool calls is trimmed in time linear in its length; a history of thousands of empty turns is
routed on a worker thread, not on the event loop; the embedder's cache of recent texts does not keep 1 MB prompts
whole; and a request that fails its contract in a hundred thousand places is described (in its terminal answer and
its dead letter) without turning every one of those errors into Python objects.
"""

from __future__ import annotations

import json
import threading
import tracemalloc
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from frugalstream.classifier.invalid import MAX_DETAIL_CHARS, describe, invalid_request_answer
from frugalstream.classifier.logic import Classifier
from frugalstream.classifier.trimming import trim_to_budget
from frugalstream.llm import onnx_models
from frugalstream.llm.embedder import MiniLMEmbedder
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.messaging import MAX_ERROR_CHARS, _error_text, decode
from frugalstream.runtime.records import Record
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, ToolCall
from tests.unit.test_policy_walls import CATALOG, ThreadRecordingCounter
from tests.unit.test_stall_walls import assert_not_quadratic, best_time

COUNTER = TokenCounter()


# --- trimming ----------------------------------------------------------------------------------------------------


def fan_out(n: int) -> list[ChatMessage]:
    """One assistant turn calling n tools in parallel, their n results, then a new question: about 130 bytes a
    call and its result, so 8,000 of them fit in a 1 MB request."""
    call = ChatMessage(role="assistant", tool_calls=tuple(ToolCall(id=f"c{i}", name="f") for i in range(n)))
    results = [ChatMessage(role="tool", tool_call_id=f"c{i}", content="ok") for i in range(n)]
    return [ChatMessage(role="user", content="look these up"), call, *results,
            ChatMessage(role="user", content="and now?")]


def test_trimming_a_wide_parallel_tool_call_is_linear() -> None:
    """Grouping each result with its call rebuilt the call's id set once per result: 8,000 parallel calls (a 1 MB
    request) took 2 s of CPU per request, quadratic in the calls."""
    def trim(n: int) -> None:
        out = trim_to_budget(fan_out(n), 100, COUNTER, "gpt-4o")
        assert out.messages[-1].content == "and now?"
    assert_not_quadratic(trim, 400)


def test_a_wide_tool_call_is_still_kept_or_dropped_with_all_its_results() -> None:
    msgs = fan_out(50)
    kept = trim_to_budget(msgs, 10_000, COUNTER, "gpt-4o")
    assert kept.dropped == 0
    dropped = trim_to_budget(msgs, 100, COUNTER, "gpt-4o")
    assert [m.content for m in dropped.messages] == ["and now?"]


# --- what runs on the event loop --------------------------------------------------------------------------------


async def test_thousands_of_empty_turns_or_calls_are_routed_off_the_event_loop() -> None:
    """The loop-or-worker choice counted characters only: 60,000 empty turns (`{"role":"user"}`, 1 MB) counted
    as no text at all, and four such requests held the loop 2.5 s (tokens, trimming and keys per turn), a poll of
    a dozen past the consumer's session timeout. A turn or a call now weighs like a short text."""
    loop_thread = threading.get_ident()
    turns = tuple(ChatMessage(role="user") for _ in range(300))
    calls = (ChatMessage(role="user", content="go"),
             ChatMessage(role="assistant", tool_calls=tuple(ToolCall(id=f"c{i}", name="f") for i in range(300))))
    for messages in (turns, calls):
        counter = ThreadRecordingCounter()
        classifier = Classifier(Settings(), counter, catalog=CATALOG)
        await classifier.handle([LLMRequest(id="r", tenant="evil", messages=messages)])
        assert counter.threads and loop_thread not in counter.threads


class ZeroEncoder:
    """Stands in for the ONNX graph: what the embedder keeps is the question, not the vectors' values."""

    def __init__(self, **_: object) -> None:
        pass

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.zeros((len(texts), 384), dtype=np.float32)


def test_the_embedders_cache_of_recent_texts_holds_their_digests_not_the_texts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The classifier embeds every unpinned request's last user turn, and the embedder's LRU of 50,000 recent
    texts kept each text whole as its key: a tenant sending distinct 1 MB prompts grew the classifier by 1 MB a
    request, toward 50 GB. Keyed by a digest, an entry costs its vector whatever the text's length."""
    monkeypatch.setattr(onnx_models, "OnnxTextEncoder", ZeroEncoder)
    embedder = MiniLMEmbedder()
    tracemalloc.start()
    try:
        for i in range(300):
            embedder.embed([f"{i} " + "x" * 100_000])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 3_000_000, f"{held} bytes held after 300 texts of 100 KB"
    text = "What are your opening hours?"
    again = CountingEncoder()
    embedder._encoder = again
    embedder.embed([text])
    embedder.embed([text])
    assert again.calls == 1, "a repeated text is still served from the cache"


class CountingEncoder(ZeroEncoder):
    def __init__(self, **_: object) -> None:
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        return super().encode(texts)


# --- invalid requests --------------------------------------------------------------------------------------------


def many_errors(n: int) -> bytes:
    """A request whose `messages` are n numbers: one validation error each (3 bytes a message)."""
    return b'{"id":"r1","tenant":"evil","messages":[' + b",".join([b"1"] * n) + b"]}"


def decode_error(raw: bytes) -> ValidationError:
    [(_, exc)] = decode([Record("llm.requests", 0, 0, None, raw, ())], LLMRequest, max_bytes=1_000_000)[1]
    assert isinstance(exc, ValidationError)
    return exc


def test_an_invalid_request_with_many_errors_is_answered_for_about_what_its_decoding_costs() -> None:
    """300,000 invalid messages (900 KB) cost 0.2 s to decode, and `errors()` made Python objects of every error
    to describe the first few: over 1 s on the event loop for the answer, 1-3 s more for the dead letter (its
    worker thread holds the GIL throughout). A poll of three such records outlasted the consumer's session
    timeout (10 s): rebalanced, redelivered, again."""
    raw = many_errors(100_000)
    decoding = best_time(lambda: decode_error(raw))
    exc = decode_error(raw)
    answering = best_time(lambda: invalid_request_answer(raw, exc, Settings()))
    lettering = best_time(lambda: _error_text(exc))
    assert answering < 2 * decoding, f"answer {answering:.3f}s, decode {decoding:.3f}s"  # was 7x
    assert lettering < 2 * decoding, f"dead letter text {lettering:.3f}s, decode {decoding:.3f}s"  # was 15x


def test_the_description_of_an_invalid_request_is_what_every_error_would_give() -> None:
    """Only the first errors are read, but the text is the one the whole list gives, cut at the same place."""
    for n in (1, 3, 5_000):
        exc = decode_error(many_errors(n))
        whole = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['type']}" for e in exc.errors())
        expected = whole if len(whole) <= MAX_DETAIL_CHARS else whole[: MAX_DETAIL_CHARS - 3] + "..."
        assert describe(exc) == expected
        letter = json.dumps([{"loc": list(e["loc"]), "type": e["type"], "msg": e["msg"]} for e in exc.errors()])
        assert _error_text(exc) == letter[:MAX_ERROR_CHARS]
