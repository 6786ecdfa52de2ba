"""Where an answer goes: the terminal message on `llm.responses`, and a best-effort copy on the producer's
reply topic when it named one (granted by its tenant's policy at the classifier)."""

from __future__ import annotations

from frugalstream.runtime.records import Out
from frugalstream.schemas import LLMRequest, LLMResponse
from frugalstream.schemas import topics as t


def response_outs(response: LLMResponse, request: LLMRequest, key: str | None) -> list[Out]:
    """The terminal message on `llm.responses`, and a copy on the producer's reply topic when it named one."""
    outs = [Out(t.RESPONSES, response, key=key or request.id)]
    if request.reply_topic:
        outs.append(Out(request.reply_topic, response, key=request.id, side=True))  # best effort
    return outs
