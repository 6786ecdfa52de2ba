"""The OpenAI-compatible HTTP entry: Chat Completions in, an `LLMRequest` on Kafka, the answer back out."""
