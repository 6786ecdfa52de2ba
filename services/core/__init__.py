"""Shared building blocks: settings, broker wiring, DLQ, logging, tokens, prices, embeddings."""
