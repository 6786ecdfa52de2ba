"""structlog JSON logging that keeps prompts and secrets out of logs by default."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEYS = frozenset({"api_key", "authorization", "password", "sasl_password", "secret", "token", "x-api-key"})
PROMPT_KEYS = frozenset({"prompt", "content", "messages", "text", "summary", "instruction", "lookup_text"})
REDACTED = "[redacted]"


def redact_event(*, log_prompts: bool) -> structlog.types.Processor:
    """Secrets are always redacted; prompt-bearing fields only unless `log_prompts` is set."""
    hidden = SECRET_KEYS if log_prompts else SECRET_KEYS | PROMPT_KEYS

    def processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event):
            if key.lower() in hidden:
                event[key] = REDACTED
        return event

    return processor


def configure_logging(level: str = "INFO", *, log_prompts: bool = False, fmt: str = "json") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_event(log_prompts=log_prompts),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for noisy in ("aiokafka", "faststream", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
