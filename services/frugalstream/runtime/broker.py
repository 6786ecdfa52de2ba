"""Kafka wiring shared by every service: one broker per process, security from settings."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from frugalstream.runtime.kafka_options import producer_options, subscriber_options
from frugalstream.runtime.settings import Settings

#: On stop, in-flight handlers get this long to finish, publish and commit before their tasks are cancelled.
#: Below Kubernetes' default 30 s termination grace period; a gateway batch with retries fits in it.
GRACEFUL_TIMEOUT_S = 25.0

#: FastStream logs a handler's exception here with its traceback; under `faststream`, so `configure_logging`
#: keeps its per-message INFO lines out while warnings and errors still show.
BROKER_LOGGER = logging.getLogger("faststream.frugalstream")


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(
            str(settings.kafka_ssl_certfile), str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    return context


def security_from_settings(settings: Settings) -> BaseSecurity | None:
    """Maps FRUGAL_KAFKA_* security settings onto FastStream's security objects (passed to aiokafka)."""
    context = _ssl_context(settings)
    use_ssl = context is not None
    if settings.kafka_security_protocol.startswith("SASL"):
        if not settings.kafka_sasl_username or settings.kafka_sasl_password is None:
            raise ValueError("SASL needs FRUGAL_KAFKA_SASL_USERNAME and FRUGAL_KAFKA_SASL_PASSWORD")
        kinds: dict[str, type[BaseSecurity]] = {
            "PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512,
        }
        sasl_cls: Any = kinds[settings.kafka_sasl_mechanism or "PLAIN"]
        security: BaseSecurity = sasl_cls(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=context,
            use_ssl=use_ssl,
        )
        return security
    if use_ssl:
        return BaseSecurity(ssl_context=context, use_ssl=True)
    return None


def aiokafka_security(settings: Settings) -> dict[str, Any]:
    """The same security as the FastStream broker, as keyword arguments for plain aiokafka clients."""
    security = security_from_settings(settings)
    if security is None:
        return {}
    from faststream.kafka.security import parse_security

    options: dict[str, Any] = parse_security(security)
    return options


def make_broker(settings: Settings, *, client_suffix: str = "") -> KafkaBroker:
    """Producer acks from all in-sync replicas; idempotence is configurable (off for brokers without it)."""
    return KafkaBroker(
        settings.kafka_bootstrap,
        client_id=f"{settings.kafka_client_id}{client_suffix}",
        security=security_from_settings(settings),
        max_request_size=max(settings.max_message_bytes * 2, 1_048_576),
        logger=BROKER_LOGGER,  # handler exceptions and client errors, with tracebacks (None hid them all)
        graceful_timeout=GRACEFUL_TIMEOUT_S,
        **producer_options(idempotent=settings.kafka_idempotent, linger_ms=settings.kafka_linger_ms),
    )


#: How long the answer path's consumers wait in one poll when nothing is buffered. A poll returns as soon as a
#: fetch brings records, so neither batching nor latency depends on it; it sets how often an idle consumer
#: loops (`runtime.batch_poll` no longer sleeps a second period after an empty poll). 100 ms keeps the idle
#: loop rate FastStream's 50 ms poll plus 50 ms sleep had: an idle `frugalstream dev` used 0.31-0.32 of a core
#: against 0.30-0.39 before, and 0.37-0.41 at 50 ms without the sleep.
ANSWER_PATH_POLL_MS = 100


def batch_subscriber_options(settings: Settings, service: str, *, max_records: int = 64) -> dict[str, Any]:
    """Batches give the services concurrency and amortise embedding work; commit follows the whole batch.

    The commit sequence per batch: validate (bad input to the DLQ), process, publish every output and wait
    for the broker's acknowledgement, then the handler returns and FastStream commits the offsets. An
    exception instead rewinds the partitions to the batch start (NACK), so nothing is lost; the stage pauses
    them first for a backoff (see `frugalstream.runtime.stage`), so a broker outage is not a busy loop. A
    stage with batches in flight at once commits them itself, in offset order (`frugalstream.runtime.inflight`).
    """
    options: dict[str, Any] = dict(subscriber_options(
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms, session_timeout_ms=settings.kafka_session_timeout_ms,
    ))
    options.update(group_id=settings.group(service), batch=True, max_records=max_records,
                   batch_timeout_ms=ANSWER_PATH_POLL_MS,
                   ack_policy=AckPolicy.NACK_ON_ERROR)
    return options
