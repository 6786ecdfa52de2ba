"""Secrets and prompts stay out of logs; SASL/TLS settings reach the Kafka clients; size limits hold."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from faststream.kafka.security import parse_security
from faststream.security import SASLScram512

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.llm.providers import OpenAIProvider
from frugalstream.runner import RunningServices
from frugalstream.runtime.broker import make_broker, security_from_settings
from frugalstream.runtime.logging import configure_logging
from frugalstream.runtime.messaging import decode
from frugalstream.runtime.records import Record
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest
from frugalstream.schemas import topics as t

SECRET_PROMPT = "zebra-7731 my account password is hunter2"
SECRET_KEY = "sk-live-DO-NOT-LOG-0123456789"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging binds the (captured) stderr of this test: later tests must not write to it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_logging")
async def test_default_logs_hold_neither_prompt_text_nor_provider_key(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from faststream.kafka import TestKafkaBroker

    calls = {"n": 0}

    def reply(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1  # first call fails (logged path), then answers
        if calls["n"] == 1:
            return httpx.Response(500, json={"error": {"message": "upstream exploded"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 1}})

    settings = Settings(state_dir=tmp_path, provider="openai", kafka_idempotent=False, openai_api_key=SECRET_KEY,
                        provider_max_attempts=1)
    configure_logging(settings.log_level, log_prompts=settings.log_prompts, fmt=settings.log_format)
    provider = OpenAIProvider(api_key=SECRET_KEY, transport=httpx.MockTransport(reply))
    resources = Resources(settings, embedder_factory=HashingEmbedder, provider_factory=lambda _n: provider)
    running = RunningServices(["classifier", "dedupe", "gateway", "accountant"], resources)
    for svc in running.services:
        await svc.start()
        svc.register(running.broker, running.publisher)
    try:
        async with TestKafkaBroker(running.broker) as broker:
            for i in range(2):
                req = LLMRequest(id=f"s{i}", tenant="acme", messages=(ChatMessage(role="user", content=SECRET_PROMPT),),
                                 cache={"policy": "no-cache"})
                await broker.publish(req.model_dump_json().encode(), t.REQUESTS)
            await broker.publish(b'{"messages": "' + SECRET_PROMPT.encode() + b'"}', t.REQUESTS)  # to the DLQ
    finally:
        for svc in reversed(running.services):
            await svc.stop()
        resources.close()
    logs = capsys.readouterr().err
    assert "provider_call" in logs and "dead_letter" in logs, "the run logged its calls and its bad input"
    assert "zebra-7731" not in logs and "hunter2" not in logs
    assert SECRET_KEY not in logs and "DO-NOT-LOG" not in logs


def test_sasl_ssl_settings_reach_the_kafka_clients(tmp_path: Path) -> None:
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                        kafka_sasl_username="svc", kafka_sasl_password="s3cret")
    security = security_from_settings(settings)
    assert isinstance(security, SASLScram512)
    kwargs = parse_security(security)
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc" and kwargs["sasl_plain_password"] == "s3cret"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    broker = make_broker(settings)
    builder: Any = broker.config.broker_config.builder
    consumer_kwargs = builder.keywords  # what every subscriber's consumer gets
    producer_kwargs = broker._connection_kwargs
    for client in (consumer_kwargs, producer_kwargs):
        assert client["security_protocol"] == "SASL_SSL" and client["sasl_mechanism"] == "SCRAM-SHA-512"
        assert client["sasl_plain_username"] == "svc" and client["ssl_context"] is not None
    assert "s3cret" not in repr(settings), "the password is a SecretStr"


def test_sasl_without_credentials_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="SASL needs"):
        security_from_settings(Settings(kafka_security_protocol="SASL_PLAINTEXT"))


def test_plaintext_has_no_security_and_ssl_alone_uses_tls() -> None:
    assert security_from_settings(Settings()) is None
    kwargs = parse_security(security_from_settings(Settings(kafka_security_protocol="SSL")))
    assert kwargs["security_protocol"] == "SSL"


def test_size_limit_is_enforced_before_parsing() -> None:
    request = LLMRequest(id="big", tenant="acme", messages=(ChatMessage(role="user", content="x" * 5_000),))
    raw = request.model_dump_json().encode()
    record = Record(t.REQUESTS, 0, 0, b"k", raw, ())
    good, bad = decode([record], LLMRequest, max_bytes=len(raw) - 1)
    assert not good and "exceeds" in str(bad[0][1])
    good, bad = decode([record], LLMRequest, max_bytes=len(raw))
    assert [g.value.id for g in good] == ["big"] and not bad
    assert make_broker(Settings(max_message_bytes=3_000_000))._connection_kwargs["max_request_size"] >= 3_000_000
