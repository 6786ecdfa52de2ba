"""frugalstream services: independent Kafka consumers that cut LLM spend."""

__version__ = "0.1.0"
