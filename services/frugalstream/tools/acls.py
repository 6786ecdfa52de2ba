"""`frugalstream acls`: the Kafka ACLs the tenant walls assume, as `kafka-acls.sh` commands to review and run.

The walls hold against anything a record says. They cannot hold against a principal that writes frugalstream's
own topics (an answer forged on `llm.responses`, a budget on `llm.budgets`, a usage record billed to another
tenant on `llm.usage`) or reads topics that carry every tenant's data (`llm.responses`, `llm.summaries`,
`llm.cost-events`, ...). So: frugalstream's services alone write its topics; an application writes only the
entry topics and reads only its own tenant's reply topics; reviewers write only their verdicts; analytics reads
the cost events and audits. What Kafka cannot check is the tenant a record names: an application that may write
`llm.requests` is trusted to name its own tenant (callers that are not go through the HTTP entry, where the API
key names the tenant).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from frugalstream.runtime.settings import Settings, TenantPolicy, UsageError
from frugalstream.schemas import topics as t

Operation = Literal["Read", "Write", "Describe", "IdempotentWrite"]
Resource = Literal["topic", "group", "cluster"]

#: What an application writes: requests and summarize jobs. Everything else it reads comes on its reply topics.
APP_WRITES = (t.REQUESTS, t.SUMMARIZE_JOBS)


@dataclass(frozen=True)
class Grant:
    principal: str
    operations: tuple[Operation, ...]
    resource: Resource
    name: str = ""
    prefixed: bool = False

    def command(self, bootstrap: str) -> str:
        words = ["kafka-acls.sh", "--bootstrap-server", bootstrap, "--add", "--allow-principal", self.principal]
        for op in self.operations:
            words += ["--operation", op]
        words += ["--cluster"] if self.resource == "cluster" else [f"--{self.resource}", self.name]
        if self.prefixed:
            words += ["--resource-pattern-type", "prefixed"]
        return shlex.join(words)


def grants(settings: Settings, *, services: str, apps: Mapping[str, str], reviewers: Sequence[str] = (),
           analytics: Sequence[str] = ()) -> list[Grant]:
    """The grants for frugalstream's services, each application principal (-> its tenant), reviewers and
    analytics. Topic names carry `topic_prefix`, reply topics too (the services write them under it); reply
    topics follow each tenant's `reply_topic_prefixes`."""
    if services in {*apps, *reviewers, *analytics}:
        raise UsageError(f"acls: {services} is frugalstream's services' principal: an application, a reviewer or "
                         "analytics given the same one could write every frugalstream topic")
    own = settings.topic("llm.")
    out = [
        Grant(services, ("Read", "Write", "Describe"), "topic", own, prefixed=True),  # every topic and its DLQ
        Grant(services, ("Read", "Describe"), "group", f"{settings.group_prefix}.", prefixed=True),
        Grant(services, ("IdempotentWrite",), "cluster"),  # brokers before Kafka 3.0 ask for it separately
    ]
    _refuse_overlaps(settings, own, {*apps.values(), *settings.tenants})
    for principal, tenant in sorted(apps.items()):
        replies = _replies(settings, tenant)
        out += [Grant(services, ("Write", "Describe"), "topic", prefix, prefixed=True) for prefix in replies]
        out += [Grant(principal, ("Write", "Describe"), "topic", settings.topic(name)) for name in APP_WRITES]
        out += [Grant(principal, ("Read", "Describe"), "topic", prefix, prefixed=True) for prefix in replies]
        out.append(Grant(principal, ("Read",), "group", f"{tenant}.", prefixed=True))
    for principal in reviewers:
        out += [Grant(principal, ("Read", "Describe"), "topic", settings.topic(t.AUDITS)),
                Grant(principal, ("Write", "Describe"), "topic", settings.topic(t.AUDIT_REVIEWS))]
    for principal in analytics:
        out += [Grant(principal, ("Read", "Describe"), "topic", settings.topic(name))
                for name in (t.COST_EVENTS, t.AUDITS)]
        out.append(Grant(principal, ("Read",), "group", "analytics.", prefixed=True))
    return out


def _replies(settings: Settings, tenant: str) -> list[str]:
    """The tenant's reply topic prefixes as the services write them (under `topic_prefix`)."""
    return [settings.topic(p) for p in settings.tenants.get(tenant, TenantPolicy()).reply_prefixes(tenant)]


def _refuse_overlaps(settings: Settings, own: str, tenants: set[str]) -> None:
    """Prefixes are granted whole, so no two owners' may nest: tenant `llm` would read every frugalstream topic,
    tenant `frugalstream` join the services' groups, and tenant `acme` read tenant `acme.eu`'s replies."""
    claims = [("frugalstream's services", "topic", own), ("frugalstream's services", "group",
               f"{settings.group_prefix}."), ("analytics", "group", "analytics.")]
    for tenant in sorted(tenants):
        owner = f"tenant {tenant!r}"
        claims += [(owner, "topic", p) for p in _replies(settings, tenant)] + [(owner, "group", f"{tenant}.")]
    for i, (owner, kind, prefix) in enumerate(claims):
        for other, other_kind, other_prefix in claims[i + 1:]:
            if owner != other and kind == other_kind and (
                    prefix.startswith(other_prefix) or other_prefix.startswith(prefix)):
                raise UsageError(f"acls: {kind} prefix {other_prefix!r} of {other} overlaps {prefix!r} of "
                                 f"{owner}: rename the tenant or set its reply_topic_prefixes")


def _app(text: str) -> tuple[str, str]:
    principal, eq, tenant = text.rpartition("=")
    if not eq or not principal or not tenant:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PRINCIPAL=TENANT, e.g. User:acme-app=acme")
    return principal, tenant


def add_acls_parser(sub: Any) -> None:
    p = sub.add_parser("acls", help="print the Kafka ACLs the tenant walls assume (kafka-acls.sh commands)")
    p.add_argument("--services", required=True, help="the principal frugalstream's services use, e.g. "
                                                     "User:frugalstream")
    p.add_argument("--app", action="append", type=_app, default=[], metavar="PRINCIPAL=TENANT",
                   help="an application principal and the tenant it produces for (repeat)")
    p.add_argument("--reviewer", action="append", default=[], help="a principal that reviews audits (repeat)")
    p.add_argument("--analytics", action="append", default=[], help="a principal that reads cost events (repeat)")
    p.add_argument("--bootstrap", help="default: FRUGAL_KAFKA_BOOTSTRAP")
    p.set_defaults(func=cmd_acls)


def cmd_acls(args: argparse.Namespace) -> int:
    settings = Settings()
    apps = dict(args.app)
    if len(apps) != len(set(args.app)):  # the same pair twice is only said twice
        raise UsageError("acls: a principal is given for two tenants; each application principal produces for one")
    given = grants(settings, services=args.services, apps=apps, reviewers=args.reviewer, analytics=args.analytics)
    print("# Review, then run as a cluster admin. Topics are created by `frugalstream topics` (an admin too).")
    for grant in given:
        print(grant.command(args.bootstrap or settings.kafka_bootstrap))
    return 0
