"""`frugalstream audit review`: nothing (the page, the tenant's audits, verdicts) is served without the per-run
token, whatever `--host` binds. The token is in the printed URL only, never in HTML served to whoever asks:
a client on the network that did not see that URL can neither read the tenant's prompts nor forge verdicts."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from frugalstream.audit.logic import Auditor
from frugalstream.llm.judges import MatchJudge
from frugalstream.tools.audit_review.app import LOCAL_HOSTS, SECURITY_HEADERS, ReviewSession, build_app
from frugalstream.tools.audit_review.serve import page_url, review_server
from tests.unit.test_audit_review import SETTINGS, MemoryStore, answered, judged


async def _session() -> tuple[ReviewSession, MemoryStore]:
    records = await judged(Auditor(SETTINGS, {"match": MatchJudge()}), answered("r1", "secret answer", "other"))
    store = MemoryStore(records)
    return ReviewSession("acme-tenant", list(records), store, reviewer="alice"), store


def _assert_nothing_served(client: TestClient, session: ReviewSession, store: MemoryStore) -> None:
    item = session.state()["item"]
    for token in ("", "wrong", session.token[:-1], "é" * 8):  # a non-ASCII guess is refused, not a 500
        page = client.get("/", params={"token": token} if token else None)
        assert page.status_code == 403
        assert session.token not in page.text and "acme-tenant" not in page.text
        assert page.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
        header = {b"x-review-token": token.encode()}  # as raw bytes on the wire
        assert client.get("/api/state", headers=header).status_code == 403
        forged = client.post("/api/verdict", headers=header,
                             json={"audit_id": item["audit_id"], "verdict": "accept",
                                   "answers_sha256": item["answers_sha256"]})
        assert forged.status_code == 403
    assert store.published == [] and session.decided == {}


@pytest.mark.parametrize("hosts", [("*",), LOCAL_HOSTS], ids=["bound-wide", "loopback"])
async def test_without_the_token_nothing_is_served_on_any_bind(hosts: tuple[str, ...]) -> None:
    session, store = await _session()
    with TestClient(build_app(session, hosts), base_url="http://127.0.0.1") as client:
        _assert_nothing_served(client, session, store)


async def test_the_page_is_served_with_the_token_in_its_url_and_never_carries_it_in_its_html() -> None:
    session, _ = await _session()
    with TestClient(build_app(session, ("*",)), base_url="http://10.1.2.3:8765") as client:
        page = client.get("/", params={"token": session.token})
        assert page.status_code == 200 and "acme-tenant" in page.text
        assert session.token not in page.text  # what the page's HTML holds, anyone's proxy or cache could too
        assert page.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
        assert page.headers["referrer-policy"] == "no-referrer"  # the URL's token goes nowhere else
        script = client.get("/app.js").text
        assert "location.search" in script and session.token not in script


async def test_the_printed_url_is_the_only_way_in_on_a_server_bound_wide() -> None:
    session, store = await _session()
    async with review_server(session, host="0.0.0.0") as url, httpx.AsyncClient() as client:
        base = url.replace("0.0.0.0", "127.0.0.1")
        assert (await client.get(base)).status_code == 403
        printed = page_url(base, session)
        assert printed.startswith(base + "?token=")
        page = await client.get(printed)
        assert page.status_code == 200 and session.token not in page.text
        token = httpx.URL(printed).params["token"]  # what the script reads from its own URL
        state = (await client.get(base + "api/state", headers={"x-review-token": token})).json()
        done = await client.post(base + "api/verdict", headers={"x-review-token": token},
                                 json={**state["item"], "verdict": "accept"})
        assert done.status_code == 200
    assert [v.reviewer for v in store.published] == ["alice"]
