"""Which call a caller-chosen `Idempotency-Key` belongs to, so a replay only ever answers a retry of that call.

Why: the pipeline answers an identity (tenant, request id) once, and replays that answer to whoever names the
identity again. So an HTTP call's request id is the caller's namespace (a digest of its API key) and its key,
`caller_request_id`: another API key of the tenant, or the tenant's Kafka producers, can never name it, on
this entry or any other behind the same load balancer, and a retry from the same API key finds its answer on
any of them. Within one caller, the first call binds the key to a fingerprint of what was asked (the request
as the pipeline would get it, without its `created_at`); the same key with another body is refused (409) and
nothing is sent.

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

__all__ = ["BOARD_REMEMBER", "BOARD_REMEMBER_S", "KEY_MAX", "Claim", "KeyBindings", "caller_request_id",
           "fingerprint"]

Claim = Literal["new", "retry", "reused"]
_NAMESPACE_HEX = 16
_NAMESPACE_SALT = b"frugalstream.http.caller\x00"
#: The longest Idempotency-Key: the namespace and its dot take the rest of the contract's 128-character id.
KEY_MAX = 128 - _NAMESPACE_HEX - 1


def caller_request_id(api_key: bytes, key: str) -> str:
    """`<namespace>.<key>`: the namespace is 64 bits of a digest of the API key (never the key itself)."""
    namespace = hashlib.sha256(_NAMESPACE_SALT + api_key).hexdigest()[:_NAMESPACE_HEX]
    return f"{namespace}.{key}"


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
