"""frugalstream: an LLM inference cost optimizer running as independent consumers on Kafka topics.

The floors, from the ground up (ARCHITECTURE.md has the picture):
- `frugalstream.schemas`: the topic contracts (pydantic models), imported by everything;
- `frugalstream.runtime`: the Kafka runtime (stage loop, messaging, broker wiring, settings, logs, metrics);
- `frugalstream.llm`: what the services share about models (prices and costing, tokens, embeddings, cache
  keys, identity, usage chains, providers and resilience, the semantic verifier);
- the five services, none importing another: `classifier`, `dedupe`, `gateway`, `summarizer`, `accountant`;
- `frugalstream.bootstrap` and `frugalstream.runner`, which build and run them;
- `frugalstream.tools`: the CLI, demo, benchmarks, evaluations, local cluster; production code never imports it.
"""

__version__ = "0.1.0"
