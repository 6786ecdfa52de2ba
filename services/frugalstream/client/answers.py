"""Matching answers on `llm.responses` to the callers waiting for them, by identity (tenant, request id).

Every client (and every HTTP entry) reads the whole answer topic. The identity includes the tenant, so a
request id another tenant reuses never resolves, or replays, the wrong caller's answer. A short memory of
recent answers lets a caller that retries with the same id (a lost HTTP connection, say) get the answer the
pipeline already gave: the pipeline answers an identity once, and should a second answer come (a request
redelivered and answered otherwise, say refused by a budget after it was paid) the first one stands, on every
entry and client alike, unless it was a retryable error. A client remembers only answers of identities
asked through it; the HTTP entry (`remember_unasked`) remembers every answer it reads, so a retry that reaches
another entry behind the same load balancer is still replayed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque

from frugalstream.schemas import LLMResponse

Identity = tuple[str, str]  # (tenant, request id)

#: How many answers, and for how long, a board remembers by default (the HTTP entry's key bindings outlive them).
REMEMBER, REMEMBER_S = 4096, 600.0


def final(response: LLMResponse) -> bool:
    """An answer a later one for the same identity may not replace: any but a retryable error."""
    return response.error is None or not response.error.retryable


class AnswerBoard:
    """Futures of waiting callers, and a bounded memory of recent answers (by count, bytes and age).

    `remember_unasked=False` remembers only answers of identities `expect`ed here (within `remember_s`, the
    last `remember` of them): a client must not hold other callers' (other tenants') answers it reads.
    """

    def __init__(self, *, remember: int = REMEMBER, remember_bytes: int = 64 * 1024 * 1024,
                 remember_s: float = REMEMBER_S, rate_window_s: float = 10.0, remember_unasked: bool = True) -> None:
        self._waiting: dict[Identity, list[asyncio.Future[LLMResponse]]] = {}
        self._since: dict[Identity, float] = {}
        self._recent: OrderedDict[Identity, tuple[LLMResponse, int, float]] = OrderedDict()
        self._recent_bytes = 0
        self._remember, self._remember_bytes, self._remember_s = remember, remember_bytes, remember_s
        self._remember_unasked = remember_unasked
        #: Identities asked here and not answered yet (answered late, after their caller gave up, they are still
        #: remembered for its retry), oldest first; only kept when `remember_unasked` is off.
        self._asked: OrderedDict[Identity, float] = OrderedDict()
        self._delivered: deque[float] = deque()
        self._rate_window_s = rate_window_s

    @property
    def pending(self) -> int:
        """Identities someone waits on."""
        return len(self._waiting)

    def recent(self, tenant: str, request_id: str) -> LLMResponse | None:
        found = self._recent.get((tenant, request_id))
        if found is None or time.monotonic() - found[2] > self._remember_s:
            return None
        return found[0]

    def expect(self, tenant: str, request_id: str) -> asyncio.Future[LLMResponse]:
        """A future for the answer of (tenant, request id); already done when it was answered recently.
        Register before producing the request, so the answer cannot arrive unseen in between."""
        future: asyncio.Future[LLMResponse] = asyncio.get_running_loop().create_future()
        if (answer := self.recent(tenant, request_id)) is not None:
            future.set_result(answer)
            return future
        key = (tenant, request_id)
        now = time.monotonic()
        self._waiting.setdefault(key, []).append(future)
        self._since.setdefault(key, now)
        if not self._remember_unasked:
            self._asked.pop(key, None)
            self._asked[key] = now
            while self._asked and (len(self._asked) > self._remember
                                   or now - next(iter(self._asked.values())) > self._remember_s):
                self._asked.popitem(last=False)
        return future

    def forget(self, tenant: str, request_id: str, future: asyncio.Future[LLMResponse]) -> None:
        """A caller gave up (timeout, disconnect): its future is dropped, the others keep waiting."""
        key = (tenant, request_id)
        futures = self._waiting.get(key)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiting[key]
            self._since.pop(key, None)

    def deliver(self, response: LLMResponse, size: int = 0) -> int:
        """Resolves every caller waiting on the response's identity; returns how many. Remembers it."""
        key = (response.tenant, response.request_id)
        now = time.monotonic()
        if self._remember_unasked or self._asked.pop(key, None) is not None or key in self._waiting:
            self._remember_answer(key, response, size, now)
        futures = self._waiting.pop(key, [])
        self._since.pop(key, None)
        for future in futures:
            if not future.done():
                future.set_result(response)
        if futures:
            self._delivered.append(now)
        self._trim_delivered(now)
        return len(futures)

    def answer_rate(self) -> float:
        """Answers per second to waiting callers over the last window (0 when none)."""
        self._trim_delivered(time.monotonic())
        return len(self._delivered) / self._rate_window_s

    def _trim_delivered(self, now: float) -> None:
        """Drops delivery times older than the rate window. Run on every delivery too, not only when the rate is
        read: a client that never asks for it (only the HTTP entry does) would keep one per answer for ever."""
        cutoff = now - self._rate_window_s
        while self._delivered and self._delivered[0] < cutoff:
            self._delivered.popleft()

    def _remember_answer(self, key: Identity, response: LLMResponse, size: int, now: float) -> None:
        if size > self._remember_bytes:
            return
        if (first := self._recent.get(key)) is not None and now - first[2] <= self._remember_s and final(first[0]):
            return  # the answer given stands: a second one (a redelivery answered otherwise) never replaces it
        old = self._recent.pop(key, None)
        if old is not None:
            self._recent_bytes -= old[1]
        self._recent[key] = (response, size, now)
        self._recent_bytes += size
        while self._recent and (len(self._recent) > self._remember or self._recent_bytes > self._remember_bytes
                                or now - next(iter(self._recent.values()))[2] > self._remember_s):
            _, (_, dropped, _) = self._recent.popitem(last=False)
            self._recent_bytes -= dropped

    def fail_all(self, exc: BaseException) -> None:
        """The answer stream stopped: nobody waits for an answer that cannot arrive."""
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        self._waiting.clear()
        self._since.clear()
