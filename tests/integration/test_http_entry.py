"""The official `openai` SDK, unmodified, against `frugalstream dev --http-port`: a chat request, a tool-call
round trip, a streamed request and a repeat served from cache, each with usage; and the walls an HTTP caller
meets (an unknown key, an image part that must never be answered from cache)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from tests.integration.test_dev_mode import broker_pids, free_port, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def dev_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`frugalstream dev --http-port` as a user runs it; yields the HTTP base URL from its ready line."""
    tmp = tmp_path_factory.mktemp("dev-http")
    port, http_port = free_port(), free_port()
    env = {**os.environ, "FRUGAL_STATE_DIR": str(tmp / "state"), "FRUGAL_SIMULATED_LATENCY_SCALE": "0.01",
           "FRUGAL_LOG_LEVEL": "WARNING"}
    for name in ("FRUGAL_PROVIDER", "FRUGAL_TOPIC_PREFIX", "FRUGAL_HTTP_API_KEYS", "FRUGAL_HTTP_API_KEYS_FILE"):
        env.pop(name, None)
    stderr = (tmp / "stderr.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "frugalstream", "dev", "--port", str(port),
                                "--http-port", str(http_port)], stdout=subprocess.PIPE, stderr=stderr, env=env,
                               cwd=tmp)
    try:
        line = wait_ready(process)
        assert f"http=http://127.0.0.1:{http_port}" in line
        yield f"http://127.0.0.1:{http_port}/v1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp / "stderr.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in broker_pids(port):
            os.kill(pid, signal.SIGKILL)
        stderr.close()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def sdk(dev_http: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=dev_http, api_key="frugal-dev", max_retries=0, timeout=60)


def test_chat_then_a_repeat_served_from_cache_with_usage(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What are your opening hours on Sunday?"}]
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=messages)  # type: ignore[arg-type]
    first = raw.parse()
    assert raw.headers["x-frugal-source"] == "llm"
    assert first.choices[0].message.content and first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    assert raw.headers["x-frugal-model"] == first.model and raw.headers["x-frugal-tier"] in ("small", "mid", "large")
    assert float(raw.headers["x-frugal-cost-usd"]) > 0
    sources = []
    for _ in range(5):  # the cache fills from llm.responses: the first repeat may race the fill
        raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=messages)  # type: ignore[arg-type]
        sources.append(raw.headers["x-frugal-source"])
        if sources[-1] == "cache_exact":
            break
    assert sources[-1] == "cache_exact", sources
    again = raw.parse()
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage is not None and again.usage.total_tokens == 0, "a cache hit bills no tokens"
    assert float(raw.headers["x-frugal-cost-usd"]) == 0 and float(raw.headers["x-frugal-saving-usd"]) > 0


def test_tool_call_round_trip(sdk: openai.OpenAI) -> None:
    messages: list[dict[str, object]] = [{"role": "user", "content": "What's the weather in Lyon right now?"}]
    first = sdk.chat.completions.create(model="auto", messages=messages, tools=[WEATHER],  # type: ignore[arg-type, list-item]
                                        tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in call.function.arguments
    assert first.usage is not None and first.usage.total_tokens > 0
    messages.append(choice.message.model_dump(exclude_none=True))  # content: null beside the tool call
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'})
    final = sdk.chat.completions.create(model="auto", messages=messages, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert final.usage is not None and final.usage.prompt_tokens > first.usage.prompt_tokens


def test_streamed_request_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "Draft a two-line welcome email."}]}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("[simulated gpt-4o-mini]"), "pinned model honoured"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_models_list_auto_and_unknown_keys_are_refused(sdk: openai.OpenAI, dev_http: str) -> None:
    ids = [m.id for m in sdk.models.list()]
    assert ids[0] == "auto" and "gpt-4o" in ids
    stranger = openai.OpenAI(base_url=dev_http, api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                    frequency_penalty=0.5)


def test_an_image_part_is_never_answered_from_cache(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    sources = [sdk.chat.completions.with_raw_response.create(model="auto", messages=messages)  # type: ignore[arg-type]
               .headers["x-frugal-source"] for _ in range(3)]
    assert sources == ["llm", "llm", "llm"]

