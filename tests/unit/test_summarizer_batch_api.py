"""The OpenAI Batch API path against a local server that speaks the protocol (files, batches, content)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from frugalstream.llm.providers import OpenAIProvider
from frugalstream.llm.providers.openai_batch import BatchRequest, OpenAIBatchClient
from frugalstream.llm.providers.simulated import packed_items
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, SummarizeItem, SummarizeJob, SummaryResult, UsageRecord
from frugalstream.summarizer.app import outs_of
from frugalstream.summarizer.batching import OpenAIBatch
from frugalstream.summarizer.logic import Summarizer, SummarizerConfig
from frugalstream.summarizer.results import Continues, Emission, Finished
from frugalstream.summarizer.store import SummaryStore
from frugalstream.tools.backfill import split_job


def completion(body: dict[str, Any], drop: str | None = None) -> dict[str, Any]:
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in body["messages"]]
    packed = packed_items(messages)
    if packed:
        content = "\n".join(f"### {i}\nsummary of {text[:24]}" for i, text in packed[1] if i != drop)
    else:
        content = "single summary of " + messages[-1].content.split("\n\n", 1)[1][:24]
    return {"id": "cmpl", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 40}}


class FakeOpenAI:
    """In-memory files and batches; a batch is in_progress on its first poll and completed on the next."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.polls = 0
        self.chat_calls = 0

    def finish(self, batch: dict[str, Any]) -> None:
        out, err = [], []
        for n, raw in enumerate(self.files[batch["input_file_id"]].decode().splitlines()):
            line = json.loads(raw)
            if n == 1:  # one request fails as a whole: its items are retried alone
                err.append({"custom_id": line["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "boom"}})
                continue
            body = completion(line["body"], drop="2" if n == 0 else None)
            out.append({"id": f"r{n}", "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "body": body}, "error": None})
        for key, lines in (("output_file_id", out), ("error_file_id", err)):
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = "".join(json.dumps(x) + "\n" for x in lines).encode()
            batch[key] = file_id
        batch["status"] = "completed"


def make_handler(api: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def reply(self, payload: Any, status: int = 200, raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/files":
                message = BytesParser(policy=default).parsebytes(
                    b"Content-Type: " + self.headers["content-type"].encode() + b"\r\n\r\n" + body)
                content = next(bytes(p.get_payload(decode=True)) for p in message.iter_parts()
                               if p.get_param("name", header="content-disposition") == "file")
                file_id = f"file-{len(api.files)}"
                api.files[file_id] = content
                self.reply({"id": file_id, "object": "file", "purpose": "batch"})
            elif self.path == "/v1/batches":
                spec = json.loads(body)
                batch_id = f"batch_{len(api.batches)}"
                api.batches[batch_id] = {"id": batch_id, "status": "validating", **spec}
                self.reply(api.batches[batch_id])
            elif self.path == "/v1/chat/completions":
                api.chat_calls += 1
                self.reply(completion(json.loads(body)))
            else:
                self.reply({"error": {"message": "not found"}}, 404)

        def do_GET(self) -> None:
            if self.path.startswith("/v1/batches/"):
                batch = api.batches[self.path.rsplit("/", 1)[1]]
                api.polls += 1
                if batch["status"] == "validating":
                    batch["status"] = "in_progress"
                elif batch["status"] == "in_progress":
                    api.finish(batch)
                self.reply(batch)
            elif self.path.startswith("/v1/files/") and self.path.endswith("/content"):
                self.reply(None, raw=api.files[self.path.split("/")[3]])
            else:
                self.reply({"error": {"message": "not found"}}, 404)

    return Handler


@pytest.fixture
def fake_openai() -> Iterator[tuple[FakeOpenAI, str]]:
    api = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


async def test_client_round_trip(fake_openai: tuple[FakeOpenAI, str]) -> None:
    _, url = fake_openai
    client = OpenAIBatchClient(base_url=url, api_key="test")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Summarize\n\nhello"}]}
    batch_id = await client.submit([BatchRequest("a", body), BatchRequest("b", body), BatchRequest("c", body)])
    assert (await client.get(batch_id)).status == "in_progress"
    status = await client.get(batch_id)
    assert status.done and status.output_file_id and status.error_file_id
    results = await client.results(status, "gpt-4o-mini")
    assert set(results) == {"a", "b", "c"}
    assert not isinstance(results["a"], Exception) and results["a"].usage.input_tokens == 100
    assert isinstance(results["b"], Exception)
    await client.aclose()


async def test_summarizer_uses_batch_api_and_resumes_the_same_batch(fake_openai: tuple[FakeOpenAI, str],
                                                                   tmp_path: Path) -> None:
    api, url = fake_openai
    settings = Settings(state_dir=tmp_path, provider="openai", openai_base_url=url)
    provider = OpenAIProvider(base_url=url, api_key="test")
    config = SummarizerConfig(pack_items=4, batch_poll_s=0.01, handler_budget_s=0.0)
    logic = Summarizer.build(settings, provider, store=SummaryStore(tmp_path / "s.sqlite"),
                             batch=OpenAIBatch(OpenAIBatchClient(base_url=url, api_key="test")), config=config)
    items = tuple(SummarizeItem(id=f"i{k}", text=f"Product {k % 12} with feature {k % 12}") for k in range(36))
    job = SummarizeJob(job_id="b1", tenant="acme", instruction="Summarize.", items=items, deadline_s=86_400)
    outs: list[Any] = []

    async def emit(emission: Emission) -> None:
        outs.extend(outs_of(emission))

    assert await logic.handle(job, emit) == Continues(job, "batch_running")  # submitted, still running
    rounds = 1
    while not isinstance(await logic.handle(job, emit), Finished):
        rounds += 1
    assert len(api.batches) == 1, "a continuation polls the persisted batch, never resubmits"
    results = [o.value for o in outs if isinstance(o.value, SummaryResult)]
    assert len(results) == 36 and all(r.status == "ok" for r in results)
    records = [o.value for o in outs if isinstance(o.value, UsageRecord)]
    batched = [r for r in records if r.steps[-1].strategy == "batch_api"]
    assert batched and all(r.steps[-1].batch for r in batched)
    # Pack 0 lost section 2 and pack 1 failed whole: 1 + 4 items retried alone, at the standard rate.
    assert api.chat_calls == 5 and len(records) - len(batched) == 5
    assert sum(r.items for r in records) == 36
    await logic.aclose()


async def test_later_part_waits_for_the_earlier_parts_batch(fake_openai: tuple[FakeOpenAI, str],
                                                            tmp_path: Path) -> None:
    api, url = fake_openai
    settings = Settings(state_dir=tmp_path, provider="openai", openai_base_url=url)
    provider = OpenAIProvider(base_url=url, api_key="test")
    config = SummarizerConfig(pack_items=20, batch_poll_s=0.01, handler_budget_s=0.0)
    logic = Summarizer.build(settings, provider, store=SummaryStore(tmp_path / "s.sqlite"),
                             batch=OpenAIBatch(OpenAIBatchClient(base_url=url, api_key="test")), config=config)
    items = [SummarizeItem(id=f"i{k}", text=f"Gadget {k % 5}") for k in range(20)]
    first, second = split_job("b2", "acme", "Summarize.", items, part_items=10, deadline_s=86_400)
    outs: list[Any] = []

    async def emit(emission: Emission) -> None:
        outs.extend(outs_of(emission))

    assert await logic.handle(first, emit) == Continues(first, "batch_running")  # batch submitted and running
    assert await logic.handle(second, emit) == Continues(second, "earlier_part")  # waits instead of paying again
    while not isinstance(await logic.handle(first, emit), Finished):
        pass
    assert await logic.handle(second, emit) == Finished(second)
    assert len(api.batches) == 1 and api.chat_calls == 1  # only the section the fake drops, retried alone
    results = [o.value for o in outs if isinstance(o.value, SummaryResult)]
    assert len(results) == 20 and {r.source for r in results[10:]} == {"reused"}
    await logic.aclose()
