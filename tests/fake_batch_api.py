"""A loopback fake of the providers' HTTP APIs, speaking their wire formats: OpenAI Chat Completions, Files and
Batch API; Anthropic Messages and Message Batches. Used by unit tests of the adapters and by the integration
tests of deferred requests (a gateway process talks to it as it would to the real providers).

Every model call is counted per prompt (the last message's text) whichever way it came, interactive or as a
batch line, so `calls[prompt] > 1` is a second payment; answers name the call's number (`<prompt> #2`).
Batches complete only when the test says so (`complete.set()`), or never, so a test can place a kill while a
batch is in flight. `cached_tokens` is what OpenAI's usage reports as read from its prompt cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from typing import Any, Self


class FakeProviderAPI:
    def __init__(self, *, cached_tokens: int = 0, cache_read: int = 0, cache_write: int = 0) -> None:
        self.calls: Counter[str] = Counter()  # prompt -> model calls (chat + batch lines)
        self.chat_calls: Counter[str] = Counter()
        self.bodies: list[tuple[str, str, Any]] = []  # (method, path, JSON body or raw text) of every request
        self.files: dict[str, str] = {}
        self.batches: dict[str, dict[str, Any]] = {}  # batch id -> state (OpenAI and Anthropic alike)
        self.created = asyncio.Event()
        self.complete = asyncio.Event()
        self.refuse_batches = False
        self.cached_tokens = cached_tokens
        self.cache_read, self.cache_write = cache_read, cache_write
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.base}/v1"

    def env(self) -> dict[str, str]:
        return {"FRUGAL_PROVIDER": "openai", "FRUGAL_OPENAI_BASE_URL": self.openai_url,
                "FRUGAL_OPENAI_API_KEY": "sk-test", "FRUGAL_ANTHROPIC_BASE_URL": self.base,
                "FRUGAL_ANTHROPIC_API_KEY": "sk-ant-test", "FRUGAL_PROVIDER_TIMEOUT_S": "20"}

    def polls(self, batch_id: str) -> int:
        return sum(1 for m, p, _ in self.bodies if m == "GET" and p.rstrip("/").endswith(batch_id))

    # --- answers ----------------------------------------------------------------------------------------------

    def _answer(self, prompt: str) -> str:
        self.calls[prompt] += 1
        return f"{prompt} #{self.calls[prompt]}"

    def _openai_body(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = str(body["messages"][-1]["content"])
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self._answer(prompt)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1500, "completion_tokens": 3,
                          "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}}

    def _anthropic_message(self, params: dict[str, Any]) -> dict[str, Any]:
        last = params["messages"][-1]["content"]
        prompt = last if isinstance(last, str) else "".join(b.get("text", "") for b in last)
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": params["model"],
                "content": [{"type": "text", "text": self._answer(prompt)}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 20, "output_tokens": 3, "cache_read_input_tokens": self.cache_read,
                          "cache_creation_input_tokens": self.cache_write}}

    # --- routes -----------------------------------------------------------------------------------------------

    async def route(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        path = path.split("?")[0]
        data: Any = None
        if body and headers.get("content-type", "").startswith("application/json"):
            data = json.loads(body)
        self.bodies.append((method, path, data if data is not None else body.decode(errors="replace")))
        if method == "POST" and path == "/v1/chat/completions":
            self.chat_calls[str(data["messages"][-1]["content"])] += 1
            return 200, self._openai_body(data)
        if method == "POST" and path == "/v1/messages":
            return 200, self._anthropic_message(data)
        if method == "POST" and path == "/v1/files":
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = "\n".join(ln for ln in body.decode().splitlines() if ln.startswith('{"custom_id"'))
            return 200, {"id": file_id, "object": "file", "purpose": "batch"}
        if method == "POST" and path in ("/v1/batches", "/v1/messages/batches"):
            if self.refuse_batches:
                return 400, {"error": {"type": "invalid_request_error", "message": "batches are not enabled"}}
            return 200, self._create(path, data)
        if m := re.fullmatch(r"/v1(/messages)?/batches/([^/]+)/cancel", path):
            state = self.batches[m.group(2)]
            state["cancelled"] = True
            return 200, self._status(m.group(2))
        if m := re.fullmatch(r"/v1/messages/batches/([^/]+)/results", path):
            return 200, self._results(m.group(1))
        if m := re.fullmatch(r"/v1(/messages)?/batches/([^/]+)", path):
            if m.group(2) not in self.batches:
                return 404, {"error": {"type": "not_found_error", "message": "no such batch"}}
            return 200, self._status(m.group(2))
        if method == "GET" and path == "/v1/batches":
            data_list = [self._status(b) for b in reversed(self.batches) if self.batches[b]["kind"] == "openai"]
            return 200, {"object": "list", "data": data_list, "has_more": False}
        if m := re.fullmatch(r"/v1/files/([^/]+)/content", path):
            return 200, self.files[m.group(1)]
        return 404, {"error": {"type": "not_found", "message": path}}

    def _create(self, path: str, data: dict[str, Any]) -> dict[str, Any]:
        if path == "/v1/batches":
            batch_id = f"batch_{len(self.batches) + 1}"
            lines = [json.loads(ln) for ln in self.files[data["input_file_id"]].splitlines()]
            self.batches[batch_id] = {"kind": "openai", "lines": lines, "metadata": data.get("metadata") or {}}
        else:
            batch_id = f"msgbatch_{len(self.batches) + 1}"
            self.batches[batch_id] = {"kind": "anthropic", "lines": data["requests"], "metadata": {}}
        self.created.set()
        return self._status(batch_id)

    def _finish(self, batch_id: str) -> bool:
        """Runs the batch's lines once it may complete (or was cancelled: then none run)."""
        state = self.batches[batch_id]
        if "output" in state:
            return True
        if state.get("cancelled"):
            state["output"] = []
            return True
        if not self.complete.is_set():
            return False
        state["output"] = [self._line(state["kind"], ln) for ln in state["lines"]]
        return True

    def _line(self, kind: str, line: dict[str, Any]) -> dict[str, Any]:
        if kind == "openai":
            return {"id": "req", "custom_id": line["custom_id"],
                    "response": {"status_code": 200, "body": self._openai_body(line["body"])}, "error": None}
        return {"custom_id": line["custom_id"],
                "result": {"type": "succeeded", "message": self._anthropic_message(line["params"])}}

    def _status(self, batch_id: str) -> dict[str, Any]:
        state = self.batches[batch_id]
        ended = self._finish(batch_id)
        if state["kind"] == "anthropic":
            return {"id": batch_id, "type": "message_batch",
                    "processing_status": "ended" if ended else "in_progress",
                    "results_url": f"https://example.invalid/v1/messages/batches/{batch_id}/results"}
        status = ("cancelled" if state.get("cancelled") else "completed") if ended else "in_progress"
        out: dict[str, Any] = {"id": batch_id, "object": "batch", "status": status, "metadata": state["metadata"]}
        if ended and state["output"]:
            file_id = f"out-{batch_id}"
            self.files[file_id] = "\n".join(json.dumps(x) for x in state["output"])
            out["output_file_id"] = file_id
        return out

    def _results(self, batch_id: str) -> str:
        self._finish(batch_id)
        return "\n".join(json.dumps(x) for x in self.batches[batch_id].get("output", []))

    # --- HTTP/1.1 -----------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                request_line, *lines = head.split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = await self.route(method, target, body, headers)
                text = payload if isinstance(payload, str) else json.dumps(payload)
                data = text.encode()
                kind = "application/jsonl" if isinstance(payload, str) else "application/json"
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {len(data)}\r\n\r\n"
                             .encode() + data)
                await writer.drain()
        writer.close()
