"""The review tools on the embedded broker, with the audit service running: audits read from `llm.audits`,
verdicts from the CSV import and from the review page's API land on `llm.audits.reviews`, and the service -
restarted since it judged them - replaces the machine's verdicts with them; an import row whose answers changed
is refused (issue 16)."""

from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord
from frugalstream.tools.audit_review.app import ReviewSession
from frugalstream.tools.audit_review.queue import Filters, latest, pending
from frugalstream.tools.audit_review.serve import review_server
from frugalstream.tools.audit_review.store import KafkaReviewStore
from frugalstream.tools.cli import main
from tests.integration.conftest import PipelineFactory
from tests.unit.test_audit_review import answered

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def records_until(store: KafkaReviewStore, tenant: str, done: object, timeout_s: float = 60.0,
                        ) -> dict[str, AuditRecord]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = {r.request_id: r for r in latest((await store.load(tenant))[0]).values()}
        if done(found) or time.monotonic() > deadline:  # type: ignore[operator]
            return found
        await asyncio.sleep(0.3)


async def test_import_and_page_verdicts_reach_the_audit_service_and_a_changed_row_is_refused(
        pipeline: PipelineFactory, integration_settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = integration_settings.model_copy(update={"audit_judges": {"default": "match"}})
    for name, value in (("KAFKA_BOOTSTRAP", settings.kafka_bootstrap), ("TOPIC_PREFIX", settings.topic_prefix),
                        ("KAFKA_IDEMPOTENT", "false"), ("STATE_DIR", str(tmp_path / "cli-state"))):
        monkeypatch.setenv(f"FRUGAL_{name}", value)
    store = KafkaReviewStore(settings, idle_s=0.5)
    async with pipeline(names=["audit"], settings=settings):
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for audit in (answered("r1", "a", "b"), answered("r2", "c", "d"), answered("r3", "e", "f"),
                          answered("g1", "g", "h", tenant="globex")):
                await producer.send_and_wait(settings.topic(t.AUDITS_ANSWERED), audit.model_dump_json().encode(),
                                             key=audit.tenant.encode())
        finally:
            await producer.stop()
        machine = await records_until(store, "acme", lambda found: len(found) == 3)
        assert sorted(machine) == ["r1", "r2", "r3"] and all(r.judge == "match" for r in machine.values())

    # A restart: the new audit service knows these audits only from `llm.audits`, and must still take their
    # reviews and count them in the same estimate.
    async with pipeline(names=["audit"], settings=settings):
        out = tmp_path / "reviews.csv"
        assert await asyncio.to_thread(main, ["audit", "export", "--tenant", "acme", "--out", str(out)]) == 0
        with out.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["audit_id"] for r in rows) == sorted(r.audit_id for r in machine.values())
        for row in rows:
            row["verdict"] = "accept"
            if row["audit_id"] == machine["r2"].audit_id:
                row["answers_sha256"] = "0" * 64  # answers that are not the audit's now
            if row["audit_id"] == machine["r3"].audit_id:
                row["verdict"] = ""  # left for the page
        with out.open("w", newline="", encoding="utf-8-sig") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        assert await asyncio.to_thread(main, ["audit", "import", str(out), "--tenant", "acme"]) == 1

        records, reviews = await store.load("acme")
        session = ReviewSession("acme", pending(records, reviews, Filters("acme")), store)
        assert [r.request_id for r in session.items] == ["r2", "r3"]  # r1 was imported
        await store.start()
        try:
            async with review_server(session) as url, httpx.AsyncClient(base_url=url) as client:
                h = {"x-review-token": session.token}
                item = (await client.get("api/state", headers=h)).json()["item"]
                state = (await client.post("api/verdict", headers=h, json={**item, "verdict": "skip"})).json()
                item = state["item"]
                assert item["audit_id"] == machine["r3"].audit_id
                state = (await client.post("api/verdict", headers=h, json={**item, "verdict": "reject"})).json()
                assert state["progress"] == {"reviewed": 1, "skipped": 1, "total": 2}
        finally:
            await store.stop()

        judged = await records_until(store, "acme", lambda f: f["r1"].judge == "human" and f["r3"].judge == "human")
        assert (judged["r1"].judge, judged["r1"].verdict) == ("human", "accept")
        assert (judged["r3"].judge, judged["r3"].verdict) == ("human", "reject")
        assert judged["r3"].estimate.n == 3  # the three acme audits, two of them judged before the restart
        assert judged["r2"].judge == "match"  # the refused row changed nothing
        _, reviews = await store.load(None)
        assert sorted((v.audit_id, v.tenant) for v in reviews) == sorted(
            (machine[r].audit_id, "acme") for r in ("r1", "r3"))
