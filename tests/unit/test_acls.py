"""`frugalstream acls` grants what the walls assume and nothing that would open them.

The walls cannot hold against a principal that writes frugalstream's own topics or reads the topics that carry
every tenant's data, so the grants are checked against the topic list itself: a topic added later is covered.
"""

from __future__ import annotations

import fnmatch

import pytest

from frugalstream.runtime.settings import Settings, TenantPolicy, UsageError
from frugalstream.schemas import topics as t
from frugalstream.tools.acls import Grant, grants
from frugalstream.tools.cli import main

SERVICES, ACME, GLOBEX, QA, BI = "User:frugalstream", "User:acme-app", "User:globex-app", "User:qa", "User:bi"


def allowed(given: list[Grant], principal: str, operation: str, topic: str) -> bool:
    return any(g.principal == principal and operation in g.operations and g.resource == "topic"
               and (topic.startswith(g.name) if g.prefixed else topic == g.name) for g in given)


def settings(**kwargs: object) -> Settings:
    return Settings(topic_prefix="prod.", **kwargs)  # type: ignore[arg-type]


def all_grants(s: Settings) -> list[Grant]:
    return grants(s, services=SERVICES, apps={ACME: "acme", GLOBEX: "globex"}, reviewers=[QA], analytics=[BI])


def test_only_the_services_write_frugalstreams_topics_and_their_dead_letters() -> None:
    s = settings()
    given = all_grants(s)
    entry = {s.topic(n) for n in (t.REQUESTS, t.SUMMARIZE_JOBS, t.AUDIT_REVIEWS)}
    for name in t.ALL_TOPICS:
        topic = s.topic(name)
        assert allowed(given, SERVICES, "Write", topic) and allowed(given, SERVICES, "Read", topic), topic
        writers = {p for p in (ACME, GLOBEX, QA, BI) if allowed(given, p, "Write", topic)}
        if topic in entry:
            assert writers, topic
        else:
            assert writers == set(), (topic, writers)  # a forged answer, budget or usage record is impossible


def test_an_application_reads_only_its_own_tenants_reply_topics() -> None:
    s = settings()
    given = all_grants(s)
    for name in t.ALL_TOPICS:  # llm.responses and llm.summaries carry every tenant's answers
        assert not allowed(given, ACME, "Read", s.topic(name)), name
    assert allowed(given, ACME, "Read", "prod.acme.replies")  # reply topics are written under the prefix too
    assert not allowed(given, ACME, "Read", "prod.globex.replies")
    assert allowed(given, SERVICES, "Write", "prod.globex.replies")  # the services copy each answer there


def test_a_tenants_own_reply_prefixes_are_the_ones_granted() -> None:
    s = settings(tenants={"acme": TenantPolicy(reply_topic_prefixes=("team-a.answers.",))})
    given = grants(s, services=SERVICES, apps={ACME: "acme"})
    assert allowed(given, ACME, "Read", "prod.team-a.answers.chat")
    assert not allowed(given, ACME, "Read", "prod.acme.replies")
    assert allowed(given, SERVICES, "Write", "prod.team-a.answers.chat")


def test_analytics_and_reviewers_get_what_they_read_and_write() -> None:
    s = settings()
    given = all_grants(s)
    assert allowed(given, BI, "Read", s.topic(t.COST_EVENTS)) and allowed(given, BI, "Read", s.topic(t.AUDITS))
    assert not allowed(given, BI, "Read", s.topic(t.RESPONSES))
    assert allowed(given, QA, "Write", s.topic(t.AUDIT_REVIEWS)) and allowed(given, QA, "Read", s.topic(t.AUDITS))


def test_commands_name_the_pattern_type_of_a_prefix() -> None:
    grant = Grant(SERVICES, ("Read", "Write"), "topic", "prod.llm.", prefixed=True)
    assert grant.command("kafka:9092") == (
        "kafka-acls.sh --bootstrap-server kafka:9092 --add --allow-principal User:frugalstream --operation Read "
        "--operation Write --topic prod.llm. --resource-pattern-type prefixed")
    assert Grant(SERVICES, ("IdempotentWrite",), "cluster").command("k:1").endswith("--cluster")


def test_the_command_prints_one_kafka_acls_line_per_grant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acls", "--services", SERVICES, "--app", f"{ACME}=acme", "--bootstrap", "kafka:9092"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert lines and all(fnmatch.fnmatch(ln, "kafka-acls.sh --bootstrap-server kafka:9092 --add *") for ln in lines)
    assert any("--allow-principal User:acme-app" in ln and "--topic llm.requests" in ln for ln in lines)


def test_a_principal_for_two_tenants_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acls", "--services", SERVICES, "--app", f"{ACME}=acme", "--app", f"{ACME}=globex"]) == 2
    assert "two tenants" in capsys.readouterr().err
    assert main(["acls", "--services", SERVICES, "--app", f"{ACME}=acme", "--app", f"{ACME}=acme"]) == 0


@pytest.mark.parametrize(("tenant", "policy"), [
    ("llm", TenantPolicy()),  # its reply topics would be llm.*: every frugalstream topic
    ("frugalstream", TenantPolicy()),  # its groups would be the services' own
    ("acme", TenantPolicy(reply_topic_prefixes=("l",))),
    ("analytics", TenantPolicy()),  # its groups would be analytics' own
])
def test_a_tenant_whose_prefixes_cover_frugalstreams_own_is_refused(tenant: str, policy: TenantPolicy) -> None:
    s = Settings(tenants={tenant: policy})
    with pytest.raises(UsageError, match="overlaps"):
        grants(s, services=SERVICES, apps={ACME: tenant})


def test_tenants_whose_prefixes_nest_are_refused() -> None:
    """A grant on acme.* would read acme.eu's replies (acme.eu.replies) and join its groups."""
    with pytest.raises(UsageError, match="acme"):
        grants(Settings(), services=SERVICES, apps={ACME: "acme", GLOBEX: "acme.eu"})
    with pytest.raises(UsageError, match="overlaps"):  # a tenant with a policy but no principal here counts too
        grants(Settings(tenants={"acme.eu": TenantPolicy()}), services=SERVICES, apps={ACME: "acme"})
    assert grants(Settings(), services=SERVICES, apps={ACME: "acme", GLOBEX: "acme-eu"})


@pytest.mark.parametrize("where", ["app", "reviewer", "analytics"])
def test_the_services_principal_given_to_anyone_else_is_refused(where: str) -> None:
    given = {"apps": {SERVICES: "acme"} if where == "app" else {ACME: "acme"},
             "reviewers": [SERVICES] if where == "reviewer" else [],
             "analytics": [SERVICES] if where == "analytics" else []}
    with pytest.raises(UsageError, match="services' principal"):
        grants(Settings(), services=SERVICES, **given)  # type: ignore[arg-type]
