"""The LLM floor the services share: prices and costing, tokens, embeddings, cache keys, identity, usage
chains, providers with their resilience, and the semantic verifier. It knows models, nothing about Kafka."""
