"""The one place that builds the services: a registry of one wiring function per service.

Each service package wires itself (`<service>.app.wire`) from the shared `Resources`; adding a service is one
line here. `Resources` is re-exported because it is what callers of `build_services` construct.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from frugalstream.accountant import app as accountant_app
from frugalstream.audit import app as audit_app
from frugalstream.classifier import app as classifier_app
from frugalstream.dedupe import app as dedupe_app
from frugalstream.gateway import app as gateway_app
from frugalstream.resources import Resources
from frugalstream.runtime.service import Service
from frugalstream.summarizer import app as summarizer_app

__all__ = ["SERVICE_NAMES", "WIRING", "Resources", "build_services"]

#: Pipeline order: the order `serve` starts them in when no names are given.
WIRING: Mapping[str, Callable[[Resources], Service]] = {
    "classifier": classifier_app.wire,
    "dedupe": dedupe_app.wire,
    "gateway": gateway_app.wire,
    "summarizer": summarizer_app.wire,
    "accountant": accountant_app.wire,
    "audit": audit_app.wire,
}
SERVICE_NAMES: tuple[str, ...] = tuple(WIRING)


def build_services(names: Sequence[str], res: Resources) -> list[Service]:
    unknown = [n for n in names if n not in WIRING]
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; choose from {', '.join(SERVICE_NAMES)}")
    return [WIRING[n](res) for n in names]
