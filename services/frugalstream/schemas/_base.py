"""Shared base of every topic contract."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

#: How far ahead of a reader's clock a control record (`llm.budgets`, `llm.thresholds`) may be stamped. Books keep
#: the latest stamp, so a record stamped in milliseconds or decades ahead would otherwise outrank every later one.
CLOCK_SKEW_S = 3600.0


#: How deep a producer's free-form JSON (tools, response_format, tool_choice, message parts) may nest. The JSON
#: parser stops near 200 levels, and later stages carry a request inside wrappers a few levels deeper: a request
#: nested just under the parser's limit would be accepted and then undecodable downstream, answered by nobody.
MAX_JSON_DEPTH = 64


def nested_deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests more than `limit` objects or arrays (iteratively: the check itself must not
    recurse on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def wire_bytes(value: BaseModel) -> int:
    """Its size as the publisher measures it: UTF-8 bytes of its JSON, not characters (a CJK character is three)."""
    return len(value.model_dump_json().encode())


class Contract(BaseModel):
    """Strict on unknown fields so a producer's typo fails loudly instead of being dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)
