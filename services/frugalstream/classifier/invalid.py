"""A terminal answer for a request that fails its contract, when it names who sent it.

The stage dead-letters the record either way; this gives its caller an error response (the app puts it on
`llm.responses`) instead of silence. The raw bytes are read leniently (any JSON object with a string `id` and
`tenant` of sane length); the message names the failing fields and error types only, never a value, since
values may be prompt text. No reply topic: it is unvalidated input, and writing where it says is exactly what
policy must grant first.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from pydantic import ValidationError

from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import first_errors
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMResponse, ResponseError

log = get_logger(__name__)
MAX_IDENTITY_CHARS = 128  # LLMRequest's own limits on id and tenant
MAX_DETAIL_CHARS = 1_500
# Past this many times the size limit the bytes are not parsed at all (no terminal message: the broker's own
# message size limit normally stops such values long before).
PARSE_LIMIT_FACTOR = 16


def _identity(raw: bytes, max_bytes: int) -> tuple[str, str, float | None] | None:
    if len(raw) > max_bytes * PARSE_LIMIT_FACTOR:
        return None
    try:
        doc: Any = json.loads(raw)
    except Exception:
        return None
    if not isinstance(doc, dict):
        return None
    rid, tenant, created = doc.get("id"), doc.get("tenant"), doc.get("created_at")
    if not (isinstance(rid, str) and isinstance(tenant, str)):
        return None
    if not (0 < len(rid) <= MAX_IDENTITY_CHARS and 0 < len(tenant) <= MAX_IDENTITY_CHARS):
        return None
    return rid, tenant, _timestamp(created)


def _timestamp(value: Any) -> float | None:
    """A finite number of seconds, or None: a 400-digit integer or an infinity is no time to answer with."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def describe(exc: Exception) -> str:
    """Field paths and error types of a validation error; the type name of anything else."""
    if isinstance(exc, ValidationError):
        # A part is over 5 characters with its "; ", so these fill the detail (`first_errors`: not all of them).
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['type']}"
                 for e in first_errors(exc, MAX_DETAIL_CHARS // 4 + 2)]
        text = "; ".join(parts)
    else:
        text = type(exc).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def invalid_request_answer(raw: bytes | None, exc: Exception, settings: Settings) -> LLMResponse | None:
    """The error response for the raw value of an undecodable request, or None if it cannot be identified."""
    if raw is None:
        return None
    found = _identity(raw, settings.max_message_bytes)
    if found is None:
        return None
    rid, tenant, created = found
    if len(raw) > settings.max_message_bytes:
        code = "too_large"
        message = (f"request of {len(raw)} bytes exceeds the {settings.max_message_bytes}-byte limit")
    else:
        code = "invalid_request"
        message = f"request does not match the llm.requests contract: {describe(exc)}"
    log.info("invalid_request_answered", tenant=tenant, request_id=rid, code=code)
    return LLMResponse(
        request_id=rid, tenant=tenant, source="error", error=ResponseError(code=code, message=message),
        created_at=created, responded_at=time.time(),
    )
