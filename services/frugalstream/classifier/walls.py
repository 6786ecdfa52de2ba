"""What a request may not do on its own say: write to a topic, read a shared scope, or run an unpriced model.

Each of these crosses a wall (another tenant's topic, frugalstream's own state, another tenant's cache, the
budget), so each is granted by the tenant's policy, never by the request. A check returns the denial (a
`ResponseError` code and a message that names what was refused, never prompt text) or None.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import LLMRequest
from frugalstream.schemas import topics as t

DLQ_SUFFIX = t.dlq_topic("")


@dataclass(frozen=True)
class Denial:
    code: str
    message: str


def _collision_form(topic: str) -> str:
    """Kafka treats `.` and `_` as colliding in topic names; compare internal names in that form."""
    return topic.replace(".", "_")


def internal_topic(topic: str, settings: Settings) -> bool:
    """A frugalstream topic, its DLQ, or any DLQ, with or without the deployment's topic prefix."""
    if any(_collision_form(name).endswith(_collision_form(DLQ_SUFFIX)) for name in (topic, settings.topic(topic))):
        return True  # `llm.requests_dlq` is Kafka's same name as `llm.requests.dlq`
    names = {_collision_form(n) for name in t.INTERNAL for n in (name, settings.topic(name))}
    # The publisher prefixes the reply topic too, so the name that would actually be written is checked as well.
    return _collision_form(topic) in names or _collision_form(settings.topic(topic)) in names


def reply_topic_denial(request: LLMRequest, policy: TenantPolicy, settings: Settings) -> Denial | None:
    topic = request.reply_topic
    if topic is None:
        return None
    if internal_topic(topic, settings):
        return Denial("reply_topic_denied", f"reply_topic {topic!r} is a frugalstream topic or a DLQ; "
                                            "no request may write there")
    prefixes = policy.reply_prefixes(request.tenant)
    if not any(topic.startswith(p) for p in prefixes):
        allowed = ", ".join(repr(p) for p in prefixes) or "none"
        return Denial("reply_topic_denied", f"reply_topic {topic!r} is not granted to tenant {request.tenant!r} "
                                            f"(allowed prefixes: {allowed})")
    if policy.reply_topic_prefixes is None and "." in topic.removeprefix(f"{request.tenant}."):
        # The default grant is one level deep: `acme.eu.replies` is the default namespace of a tenant `acme.eu`
        # whether or not the settings name it (on Kafka a tenant is a field of the request, so the walls cannot
        # list the tenants they were never told of). A deeper namespace needs an explicit grant.
        return Denial("reply_topic_denied", f"reply_topic {topic!r} is below tenant {request.tenant!r}'s default "
                                            f"namespace, which is one level deep ({request.tenant}.<name>); "
                                            "grant deeper topics in the tenant's reply_topic_prefixes")
    # A grant never reaches into a narrower namespace granted to another tenant: `acme.` covers `acme.eu.`, the
    # default grant of tenant `acme.eu`, whose callers wait there for their answers. The longest granted prefix
    # that matches owns the topic (a prefix the operator granted to both tenants is shared, as configured).
    owners: dict[int, set[str]] = {}
    for tenant, granted in ((request.tenant, policy), *settings.tenants.items()):
        for prefix in granted.reply_prefixes(tenant):
            if _collision_form(topic).startswith(_collision_form(prefix)):
                owners.setdefault(len(prefix), set()).add(tenant)
    if request.tenant not in owners[max(owners)]:
        return Denial("reply_topic_denied", f"reply_topic {topic!r} is in a namespace granted to another tenant")
    return None


def shared_scope_denial(request: LLMRequest, policy: TenantPolicy) -> Denial | None:
    scope = request.cache.shared_scope
    if scope is None or scope in policy.shared_scopes:
        return None
    return Denial("shared_scope_denied", f"shared cache scope {scope!r} is not granted to tenant "
                                         f"{request.tenant!r}")


def unpriced_pin_denial(model: str, policy: TenantPolicy, catalog: PriceCatalog) -> Denial | None:
    if policy.allow_unpriced_models or catalog.has(model):
        return None
    return Denial("unpriced_model", f"model {model!r} has no price in the catalog ({catalog.version}); "
                                    "add a price override or ask for allow_unpriced_models")


def admission_denial(request: LLMRequest, policy: TenantPolicy, settings: Settings) -> Denial | None:
    """The walls checked before any routing work (the pin is checked after budgets decided whether it stays)."""
    return reply_topic_denial(request, policy, settings) or shared_scope_denial(request, policy)
