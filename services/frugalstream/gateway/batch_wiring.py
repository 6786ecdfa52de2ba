"""Which batch backend serves which provider, from the settings: the gateway's `wire` calls this once.

A provider gets a batch backend only when its chat adapter is the real one (a test's fake provider, or an
endpoint built some other way, keeps every request interactive). An OpenAI-compatible server without a Batch
API (vLLM, Ollama) refuses the first job; its members are then answered interactively, at once.
"""

from __future__ import annotations

from frugalstream.gateway.batch_jobs import BatchJobStore
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.deferred import DeferPolicy
from frugalstream.gateway.logic import Gateway
from frugalstream.llm.providers import AnthropicProvider, OpenAIProvider, SimulatedProvider
from frugalstream.llm.providers.anthropic_batch import AnthropicBatchJobs
from frugalstream.llm.providers.batch_api import BatchJobs, OpenAIBatchJobs, SimulatedBatchJobs
from frugalstream.llm.providers.openai_batch import OpenAIBatchClient
from frugalstream.resources import Resources
from frugalstream.runtime.settings import Settings


def defer_policy(s: Settings) -> DeferPolicy:
    return DeferPolicy(gather_s=s.batch_gather_s, max_requests=s.batch_max_requests,
                       max_job_bytes=int(s.max_message_bytes * 0.8), poll_interval_s=s.batch_poll_interval_s,
                       min_lead_s=s.batch_min_lead_s, fallback_margin_s=s.batch_fallback_margin_s)


def batch_backends(res: Resources, gateway: Gateway) -> dict[str, BatchJobs]:
    s = res.settings
    backends: dict[str, BatchJobs] = {}
    for name, chat in gateway.providers.items():
        if isinstance(chat, SimulatedProvider):
            backends[name] = SimulatedBatchJobs(chat, delay_s=s.simulated_batch_delay_s)
        elif isinstance(chat, OpenAIProvider):
            client = OpenAIBatchClient(base_url=s.openai_base_url, api_key=s.secret(s.openai_api_key,
                                       s.openai_api_key_file), timeout_s=s.provider_timeout_s, name=chat.name)
            backends[name] = OpenAIBatchJobs(client, chat)
        elif isinstance(chat, AnthropicProvider):
            backends[name] = AnthropicBatchJobs(chat, base_url=s.anthropic_base_url, timeout_s=s.provider_timeout_s,
                                                api_key=s.secret(s.anthropic_api_key, s.anthropic_api_key_file))
    return backends


def build_batch_runner(res: Resources, gateway: Gateway, store: BatchJobStore) -> BatchRunner:
    s = res.settings
    return BatchRunner(gateway, store, batch_backends(res, gateway), defer_policy(s),
                       tick_s=min(1.0, s.batch_poll_interval_s))
