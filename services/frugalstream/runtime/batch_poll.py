"""A batch poll that does not wait twice for nothing.

FastStream 0.7's batch subscriber calls ``getmany(timeout_ms=batch_timeout_ms)``, which already waits up to
that long and returns as soon as a fetch brings records, and then, when it brought none, sleeps
``batch_timeout_ms`` again. A record that lands during that sleep waits up to a whole period before anyone
looks, on every hop: after a quiet spell of a few milliseconds the classifier's and the gateway's hops showed
a p99 of 50-55 ms at any fetch wait. The sleep exists to stop a busy loop when ``getmany`` returns empty at
once; here it sleeps only the part of the period that poll did not wait, so an idle consumer still polls
once per period and a record is picked up when its fetch arrives.
"""

from __future__ import annotations

from asyncio import sleep
from itertools import chain
from time import monotonic
from typing import TYPE_CHECKING, Any

from faststream.kafka.subscriber.usecase import BatchSubscriber

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord


class PromptBatchSubscriber(BatchSubscriber):
    """FastStream's batch subscriber, with an empty poll that waits one period in all (see the module)."""

    __slots__ = ()

    async def get_msg(self, consumer: AIOKafkaConsumer) -> tuple[ConsumerRecord, ...]:
        started = monotonic()
        messages = await consumer.getmany(timeout_ms=self.batch_timeout_ms, max_records=self.max_records)
        if messages:
            return tuple(chain(*messages.values()))
        rest = self.batch_timeout_ms / 1000 - (monotonic() - started)
        if rest > 0.001:  # returned early with nothing (a rebalance, a stopped fetch): no busy loop
            await sleep(rest)
        return ()


def prompt_polling(subscriber: Any) -> Any:
    """Make a subscriber FastStream built poll as `PromptBatchSubscriber` does; other kinds are left as built.

    The subclass adds no state (empty ``__slots__``), so the instance keeps every field FastStream gave it;
    a FastStream that builds a different class for batches is caught by the unit test on this function.
    """
    if type(subscriber) is BatchSubscriber:
        subscriber.__class__ = PromptBatchSubscriber
    return subscriber
