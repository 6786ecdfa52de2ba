"""Long waits say how far they got and what they are waiting for.

A backfill can wait hours for a provider's batch API, or forever for a summarizer nobody started; both look
the same from the outside (nothing arrives), so the watch tells them apart by whether the summarizer has
answered at all, and prints a line when a wait turns quiet, every `repeat_s` while it stays quiet, and when
it moves again: a log without a live terminal still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WaitWatch:
    """Feed it `observe(done, answered, now)` on every poll; it returns the status to show and, now and
    then, a line to print."""

    total: int
    started: float
    waiting_for: str = "the summarizer"
    hint: str = "is `frugalstream serve summarizer` running against FRUGAL_KAFKA_BOOTSTRAP?"
    quiet_after_s: float = 30.0
    repeat_s: float = 300.0
    done: int = 0
    answered: bool = False
    last_change: float = field(init=False)
    _announced: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.last_change = self.started

    def rate(self, now: float) -> float:
        return self.done / (now - self.started) if now > self.started else 0.0

    def observe(self, done: int, answered: bool, now: float) -> tuple[str, str | None]:
        line: str | None = None
        if done != self.done or answered != self.answered:
            if self._announced is not None:
                line = f"{self.waiting_for} answered again: {done}/{self.total} done"
            self.done, self.answered, self.last_change, self._announced = done, answered, now, None
        quiet = now - self.last_change
        progress = f"{self.done}/{self.total} done, {self.rate(now):.1f}/s"
        if quiet < self.quiet_after_s:
            return progress, line
        if not self.answered:
            status = f"no answer from {self.waiting_for} for {quiet:.0f} s: {self.hint}"
        else:
            status = (f"{progress}; nothing new from {self.waiting_for} for {quiet:.0f} s (a provider batch job "
                      "can take hours when the deadline allows)")
        if self._announced is None or now - self._announced >= self.repeat_s:
            self._announced, line = now, status
        return status, line
