"""An identity's first answer is the one every retry gets: a second answer on `llm.responses` (a request redelivered
and answered otherwise, e.g. refused by a budget after it was answered and paid) never replaces it, on the HTTP
entry's board (which remembers every answer) as on a client's; only a retryable error gives way to a later answer."""

from __future__ import annotations

import pytest

from frugalstream.client.answers import AnswerBoard
from frugalstream.schemas import LLMResponse
from frugalstream.schemas.responses import ResponseError


def answer(text: str | None, *, error: str | None = None, retryable: bool = False) -> LLMResponse:
    return LLMResponse(request_id="r1", tenant="acme", source="error" if error else "llm", content=text,
                       error=ResponseError(code=error, message=error, retryable=retryable)  # type: ignore[arg-type]
                       if error else None, responded_at=1.0)


@pytest.mark.parametrize("unasked", [True, False])
async def test_a_second_answer_for_an_identity_never_replaces_the_first(unasked: bool) -> None:
    board = AnswerBoard(remember_unasked=unasked)
    first = board.expect("acme", "r1")
    board.deliver(answer("Paris"))
    board.deliver(answer(None, error="budget_exceeded"))
    assert (await first).content == "Paris"
    retry = board.expect("acme", "r1")
    assert retry.done() and retry.result().content == "Paris"
    remembered = board.recent("acme", "r1")
    assert remembered is not None and remembered.content == "Paris"


async def test_a_retryable_error_is_replaced_by_a_later_answer() -> None:
    board = AnswerBoard()
    board.deliver(answer(None, error="timeout", retryable=True))
    board.deliver(answer("Paris"))
    remembered = board.recent("acme", "r1")
    assert remembered is not None and remembered.content == "Paris"
