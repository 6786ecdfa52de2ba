"""The Kafka runtime floor: the stage loop, records and publishing, broker wiring, settings, logs, metrics,
topic admin and state-topic readers. It knows topics and offsets, nothing about models."""
