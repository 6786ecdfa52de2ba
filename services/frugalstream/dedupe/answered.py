"""The answered-id memory: which identities already have their terminal answer, and whose answer must not be stored.

Every request gets one terminal answer: identities seen answered (by dedupe, the gateway, or in a rebuilt entry)
are never answered again, whatever a redelivery or a re-routing brings back. Both sets are bounded, forgetting
their oldest members first.
"""

from __future__ import annotations

from collections import OrderedDict


class BoundedSet:
    """Insertion-ordered set that forgets its oldest members past `limit`."""

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def add(self, item: str) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def discard(self, item: str) -> bool:
        """Removes `item`; True when it was there."""
        if item not in self._items:
            return False
        del self._items[item]
        return True

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)


class AnsweredMemory:
    """Identities with a terminal answer, and the sampled ones dispatched whose answer must not be stored.

    The classifier already marks a sampled request `no-store` (the gateway then answers `cacheable=False`);
    dedupe remembers the identities it dispatched that way and refuses to store their answers too, in case it
    did not.
    """

    def __init__(self, limit: int = 500_000) -> None:
        self.answered = BoundedSet(limit)
        self.unstored = BoundedSet(limit)

    def __contains__(self, key: object) -> bool:
        return key in self.answered

    def mark(self, key: str) -> None:
        self.answered.add(key)

    def refuse_store(self, key: str) -> None:
        self.unstored.add(key)

    def may_store(self, key: str) -> bool:
        """Whether the answer of `key` may be stored. Asking changes nothing: a redelivered answer gets the same
        reply; the refusal is used up (`stored`) once the answer's outputs are acknowledged."""
        return key not in self.unstored

    def stored(self, key: str) -> None:
        """The answer of `key` was handled: its refusal, if any, is used up."""
        self.unstored.discard(key)
