"""A Python client over Kafka: `submit` (fire and forget) and `complete` (await the answer), async and sync."""

from frugalstream.client.answers import AnswerBoard
from frugalstream.client.client import FrugalClient, SyncFrugalClient, build_request
from frugalstream.client.kafka import AnswerReaderFailed

__all__ = ["AnswerBoard", "AnswerReaderFailed", "FrugalClient", "SyncFrugalClient", "build_request"]
