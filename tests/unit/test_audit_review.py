"""`frugalstream audit review | export | import` without a browser: the queue, the app's API and its walls,
CSV round trips and every reason an import row is refused (issue 16). The browser test is
`test_audit_review_browser.py`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from frugalstream.audit.logic import Auditor
from frugalstream.llm.audits import answers_digest, audit_id
from frugalstream.llm.judges import MatchJudge
from frugalstream.runtime.settings import Settings
from frugalstream.schemas.audits import AuditAnswer, AuditRecord, AuditRequest, DecisionKind, ReviewVerdict
from frugalstream.tools.audit_review.app import ReviewSession, build_app
from frugalstream.tools.audit_review.csv_io import check_rows, read_rows, write_export
from frugalstream.tools.audit_review.queue import Filters, latest, pending
from frugalstream.tools.cli import main

SETTINGS = Settings(audit_rate=1.0, audit_judges={"default": "match"}, semantic_verifier="features")
HOSTILE = '</pre><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


class MemoryStore:
    """The broker's two topics in memory: what the app reads, and what it publishes to `llm.audits.reviews`."""

    def __init__(self, records: Sequence[AuditRecord] = (), reviews: Sequence[ReviewVerdict] = ()) -> None:
        self.records, self.reviews = list(records), list(reviews)
        self.published: list[ReviewVerdict] = []

    async def load(self, tenant: str | None) -> tuple[list[AuditRecord], list[ReviewVerdict]]:
        return ([r for r in self.records if tenant in (None, r.tenant)],
                [v for v in self.reviews if tenant in (None, v.tenant)])

    async def publish(self, verdicts: Sequence[ReviewVerdict]) -> None:
        self.published.extend(verdicts)
        self.reviews.extend(verdicts)


def answered(rid: str, candidate: str, reference: str, *, tenant: str = "acme", kind: DecisionKind = "routed_down",
             task_type: str = "faq") -> AuditRequest:
    return AuditRequest(audit_id=audit_id(tenant, rid, kind), tenant=tenant, request_id=rid, kind=kind,
                        task_type=task_type, tier="small", question=f"question {rid}", score=0.1, threshold=0.5,
                        candidate=AuditAnswer(content=candidate, model="gpt-4o-mini"),
                        reference=AuditAnswer(content=reference, model="gpt-4o"), sampled_at=1.0)


async def judged(auditor: Auditor, *audits: AuditRequest) -> list[AuditRecord]:
    """Records as the audit service publishes them on `llm.audits` (so the same auditor can count reviews)."""
    records, _ = await auditor.judge(list(audits))
    assert len(records) == len(audits)
    return records


def test_queue_is_the_tenants_audits_no_person_judged_on_these_answers() -> None:
    def rec(rid: str, tenant: str = "acme", kind: DecisionKind = "routed_down", judge: str = "match",
            served: str = "a") -> AuditRecord:
        a = answered(rid, served, "b", tenant=tenant, kind=kind)
        return AuditRecord(audit_id=a.audit_id, tenant=tenant, request_id=rid, kind=kind, task_type="faq",
                           candidate=a.candidate, reference=a.reference, judge=judge, verdict="reject",
                           estimate={"tenant": tenant, "task_type": "faq", "kind": kind, "n": 1, "accepted": 0,
                                     "rate": 0.0, "low": 0.0, "high": 0.8}, judged_at=1.0)
    open_, other, near, by_person, seen, changed = (rec("r1"), rec("r2", tenant="globex"), rec("r3", kind="near_miss"),
                                                    rec("r4"), rec("r5"), rec("r6", served="old"))
    records = [open_, other, near, by_person, by_person.model_copy(update={"judge": "human"}), seen, changed,
               changed.model_copy(update={"candidate": AuditAnswer(content="new")})]
    reviews = [ReviewVerdict(audit_id=seen.audit_id, tenant="acme", verdict="accept", reviewed_at=2.0,
                             answers_sha256=answers_digest(seen.candidate, seen.reference)),
               ReviewVerdict(audit_id=changed.audit_id, tenant="acme", verdict="accept", reviewed_at=2.0,
                             answers_sha256=answers_digest(changed.candidate, changed.reference))]
    assert [r.request_id for r in pending(records, reviews, Filters("acme"))] == ["r1", "r3", "r6"]
    assert pending(records, reviews, Filters("acme"))[-1].candidate.content == "new"  # the latest record
    assert [r.request_id for r in pending(records, reviews, Filters("acme", frozenset({"near_miss"})))] == ["r3"]
    assert pending(records, reviews, Filters("acme", task_types=frozenset({"chat"}))) == []


async def test_api_publishes_verdicts_tied_to_the_audit_its_tenant_and_answers_and_the_service_counts_them() -> None:
    auditor = Auditor(SETTINGS, {"match": MatchJudge()})
    ours = await judged(auditor, answered("r1", "Paris", "Lyon"), answered("r2", "9am", "9 am"))
    theirs = await judged(auditor, answered("r9", "x", "y", tenant="globex"))
    store = MemoryStore([*ours, *theirs])
    session = ReviewSession("acme", pending(*await store.load("acme"), Filters("acme")), store, reviewer="ann")
    with TestClient(build_app(session), base_url="http://127.0.0.1") as client:
        assert client.get("/api/state").status_code == 403  # no token: another page cannot read audits
        h = {"x-review-token": session.token}
        state = client.get("/api/state", headers=h).json()
        assert state["progress"] == {"reviewed": 0, "skipped": 0, "total": 2}
        first = state["item"]
        assert (first["served"], first["baseline"], first["question"]) == ("Paris", "Lyon", "question r1")
        foreign = {"audit_id": theirs[0].audit_id, "verdict": "accept",
                   "answers_sha256": answers_digest(theirs[0].candidate, theirs[0].reference)}
        assert client.post("/api/verdict", headers=h, json=foreign).status_code == 409  # another tenant's audit
        assert client.post("/api/verdict", headers=h, json={**first, "verdict": "accept",
                                                            "answers_sha256": "0" * 64}).status_code == 409
        assert client.post("/api/verdict", headers=h, json={**first, "verdict": "maybe"}).status_code == 400
        assert client.post("/api/verdict", json={**first, "verdict": "accept"}).status_code == 403
        assert store.published == []
        state = client.post("/api/verdict", headers=h, json={**first, "verdict": "accept"}).json()
        assert client.post("/api/verdict", headers=h, json={**first, "verdict": "reject"}).status_code == 409
        assert state["progress"] == {"reviewed": 1, "skipped": 0, "total": 2}
        state = client.post("/api/verdict", headers=h, json={**state["item"], "verdict": "skip"}).json()
        assert state == {"item": None, "progress": {"reviewed": 1, "skipped": 1, "total": 2}}
        assert TestClient(build_app(session), base_url="http://evil.example").get("/").status_code == 400
    [verdict] = store.published
    assert (verdict.audit_id, verdict.tenant, verdict.verdict, verdict.reviewer) == (ours[0].audit_id, "acme",
                                                                                     "accept", "ann")
    counted, _ = auditor.review(store.published)  # the audit service's own code takes it
    assert counted[0].judge == "human" and counted[0].verdict == "accept" and ours[0].verdict == "reject"
    assert pending(*await store.load("acme"), Filters("acme")) == [ours[1]]  # reviewed audits leave the queue


def test_page_and_api_never_carry_answers_as_markup() -> None:
    record = AuditRecord(audit_id="audit-1", tenant="<b>acme</b>", request_id="r", kind="routed_down",
                         task_type="faq", question=HOSTILE, candidate=AuditAnswer(content=HOSTILE),
                         reference=AuditAnswer(content="ok"), judge="match", verdict="accept",
                         estimate={"tenant": "acme", "task_type": "faq", "kind": "routed_down", "n": 1,
                                   "accepted": 1, "rate": 1.0, "low": 0.2, "high": 1.0}, judged_at=1.0)
    session = ReviewSession("<b>acme</b>", [record], MemoryStore())
    with TestClient(build_app(session), base_url="http://127.0.0.1") as client:
        page = client.get("/", params={"token": session.token})
        assert "<script>window" not in page.text and "<b>acme</b>" not in page.text and "&lt;b&gt;" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script could run
        api = client.get("/api/state", headers={"x-review-token": session.token})
        assert api.headers["content-type"] == "application/json" and api.json()["item"]["served"] == HOSTILE


async def test_csv_round_trip_publishes_good_rows_and_rejects_each_bad_row_with_its_reason(tmp_path: Path) -> None:
    auditor = Auditor(SETTINGS, {"match": MatchJudge()})
    records = await judged(auditor, *(answered(f"r{i}", text, "ref") for i, text in
                                      enumerate(["=HYPERLINK(\"x\")", "a", "b", "c", "d", "e", "f"])))
    other = await judged(auditor, answered("g1", "x", "y", tenant="globex"))
    out = tmp_path / "reviews.csv"
    assert write_export(records, out) == 7
    with out.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    assert rows[1][5] == "'=HYPERLINK(\"x\")"  # a spreadsheet shows it, never runs it
    edits = {1: "accept", 2: " Reject ", 3: "maybe", 4: "", 5: "accept", 6: "accept", 7: "accept"}
    for i, verdict in edits.items():
        rows[i][8] = verdict
    rows[5][0] = "audit-" + "f" * 32                               # unknown audit
    rows[6][0], rows[6][7] = other[0].audit_id, answers_digest(other[0].candidate, other[0].reference)  # other tenant
    rows.append(list(rows[1]))                                      # the same audit twice
    with out.open("w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows(rows)
    now = latest([*records, *other])
    now[records[6].audit_id] = records[6].model_copy(update={"reference": AuditAnswer(content="since changed")})
    check = check_rows(read_rows(out), now, reviewer="bob", now=5.0)
    assert [(v.audit_id, v.verdict, v.tenant, v.reviewer) for v in check.verdicts] == [
        (records[0].audit_id, "accept", "acme", "bob"), (records[1].audit_id, "reject", "acme", "bob")]
    assert check.blank == 1
    reasons = {row: reason for row, _, reason in check.rejected}
    assert set(reasons) == {4, 6, 7, 8, 9}
    assert reasons[4].startswith("bad verdict 'maybe'") and reasons[6].startswith("unknown audit")
    assert reasons[7].startswith("wrong tenant") and reasons[8].startswith("answers changed since export")
    assert reasons[9].startswith("the audit was already given a verdict on row 2")
    only_globex = check_rows(read_rows(out), now, tenant="globex")
    assert only_globex.verdicts == [] and {r.split(":")[0].split(" (")[0] for _, _, r in only_globex.rejected} == {
        "wrong tenant", "bad verdict 'maybe'", "the audit was already given a verdict on row 2"}
    counted, _ = auditor.review(check.verdicts)
    assert [r.judge for r in counted] == ["human", "human"]


def test_import_of_a_file_without_the_export_columns_is_one_line_and_exit_2(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,answer\n1,x\n")
    assert main(["audit", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no column audit_id, tenant, answers_sha256, verdict" in err
