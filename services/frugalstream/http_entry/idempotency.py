"""Which call a caller-chosen `Idempotency-Key` belongs to, so a replay only ever answers a retry of that call.

Why: the key becomes the request id and the pipeline answers an identity (tenant, id) once. Two callers of one
tenant (two API keys, two end users) that pick the same key for different questions would otherwise share one
answer: the second gets the first's (replayed from the board's recent answers, or shared while it is in
flight) and its own question is never asked. So the first call binds the key to a fingerprint of who asked
what (the API key's digest and the request as the pipeline would get it, without its `created_at`); a call
with the same key and the same fingerprint is a retry and is answered as before, any other is refused (409)
and nothing is sent.

The bindings live at least as long as the answers they guard: the board remembers an answer for
`BOARD_REMEMBER_S` after it arrives (and an answer may arrive up to the call's timeout after the call), and
at most `BOARD_REMEMBER` answers; this memory keeps a binding `BOARD_REMEMBER_S + timeout` after its last use
and `BOARD_REMEMBER + max_pending` bindings, so a remembered answer never outlives the binding that guards it.
The memory is this entry's: another entry behind the same load balancer does not see it (see the README).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from frugalstream.client.answers import REMEMBER as BOARD_REMEMBER
from frugalstream.client.answers import REMEMBER_S as BOARD_REMEMBER_S
from frugalstream.schemas import LLMRequest

__all__ = ["BOARD_REMEMBER", "BOARD_REMEMBER_S", "Claim", "KeyBindings", "fingerprint"]

Claim = Literal["new", "retry", "reused"]


def fingerprint(caller: bytes, request: LLMRequest) -> bytes:
    """Who asked (the API key's digest) and what (the request without its volatile `created_at`)."""
    digest = hashlib.sha256(caller)
    digest.update(b"\x00")
    digest.update(request.model_dump_json(exclude={"created_at"}).encode())
    return digest.digest()


class KeyBindings:
    """(tenant, Idempotency-Key) -> the fingerprint of the call that first used it; bounded by count and age."""

    def __init__(self, *, remember: int, remember_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._bound: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self._remember, self._remember_s, self._clock = remember, remember_s, clock

    def __len__(self) -> int:
        return len(self._bound)

    def claim(self, tenant: str, key: str, print_: bytes) -> Claim:
        """`new` (now bound to this call), `retry` (bound to this same call) or `reused` (bound to another)."""
        now = self._clock()
        self._expire(now)
        found = self._bound.get((tenant, key))
        if found is not None and found[0] != print_:
            return "reused"
        self._bound[(tenant, key)] = (print_, now)
        self._bound.move_to_end((tenant, key))
        while len(self._bound) > self._remember:
            self._bound.popitem(last=False)
        return "new" if found is None else "retry"

    def release(self, tenant: str, key: str, print_: bytes) -> None:
        """Nothing was sent under a new binding (refused on the way out): the key is free again."""
        if (found := self._bound.get((tenant, key))) is not None and found[0] == print_:
            del self._bound[(tenant, key)]

    def _expire(self, now: float) -> None:
        while self._bound and now - next(iter(self._bound.values()))[1] > self._remember_s:
            self._bound.popitem(last=False)
