"""`frugalstream audit review` in a real headless browser (Debian's chromium, driven by selenium through
chromedriver): keys and buttons give verdicts, they land on the review topic tied to their audit, the audit
service's own code counts them, and a hostile answer is shown as text, never run (issue 16).

Skips only when chromium or its driver is not installed (`apt-get install -y chromium chromium-driver`).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from frugalstream.audit.logic import Auditor
from frugalstream.llm.audits import answers_digest
from frugalstream.llm.judges import MatchJudge
from frugalstream.tools.audit_review.app import ReviewSession
from frugalstream.tools.audit_review.queue import Filters, pending
from frugalstream.tools.audit_review.serve import page_url, review_server
from tests.unit.test_audit_review import HOSTILE, SETTINGS, MemoryStore, answered, judged

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver")]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def drive(url: str, profile: Path) -> dict[str, object]:
    """Reviews four audits: `a`, `r` and `s` on the keyboard, then the accept button; returns what was seen."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    seen: dict[str, object] = {}
    try:
        wait = WebDriverWait(browser, 15)

        def text(element_id: str) -> str:
            return str(browser.execute_script(f"return document.getElementById('{element_id}').textContent"))

        def press(key: str, progress: str) -> None:
            ActionChains(browser).send_keys(key).perform()
            wait.until(lambda _: text("progress") == progress)

        browser.get(url)
        wait.until(lambda _: text("progress") == "0 reviewed of 4")
        seen["first"] = (text("question"), text("served"), text("baseline"))
        press("a", "1 reviewed of 4")
        seen["hostile"] = (text("served"), text("question"))
        seen["children"] = len(browser.find_elements(By.CSS_SELECTOR, "#served *, #question *"))
        seen["images"] = len(browser.find_elements(By.TAG_NAME, "img"))
        seen["pwned"] = browser.execute_script("return window.__pwned === undefined ? null : window.__pwned")
        press("r", "2 reviewed of 4")
        press("s", "2 reviewed of 4, 1 skipped")
        browser.find_element(By.CSS_SELECTOR, "button[data-verdict=accept]").click()
        wait.until(lambda _: text("progress") == "3 reviewed of 4, 1 skipped")
        seen["done"] = browser.find_element(By.ID, "done").is_displayed()
        seen["status"] = text("status")
    finally:
        browser.quit()
    return seen


async def test_keys_and_buttons_publish_verdicts_the_audit_service_counts_and_answers_stay_text() -> None:
    auditor = Auditor(SETTINGS, {"match": MatchJudge()})
    ours = await judged(auditor, answered("r1", "We open at 9.", "We open at 9 am."),
                        answered("r2", HOSTILE, "Fine."), answered("r3", "x", "y"), answered("r4", "Yes", "No"))
    theirs = await judged(auditor, answered("g1", "secret of globex", "z", tenant="globex"))
    store = MemoryStore([*ours, *theirs])
    session = ReviewSession("acme", pending(*await store.load("acme"), Filters("acme")), store, reviewer="ann")
    with tempfile.TemporaryDirectory(prefix="frugal-chromium-") as profile:
        async with review_server(session) as url:
            assert url.startswith("http://127.0.0.1:")
            seen = await asyncio.to_thread(drive, page_url(url, session), Path(profile))
    assert seen["first"] == ("question r1", "We open at 9.", "We open at 9 am.")
    assert seen["hostile"] == (HOSTILE, "question r2")  # the markup is shown as the text it is
    assert seen["children"] == 0 and seen["images"] == 0 and seen["pwned"] is None
    assert seen["done"] is True and seen["status"] == ""
    got = [(v.audit_id, v.tenant, v.verdict, v.answers_sha256) for v in store.published]
    assert got == [(r.audit_id, "acme", verdict, answers_digest(r.candidate, r.reference))
                   for r, verdict in ((ours[0], "accept"), (ours[1], "reject"), (ours[3], "accept"))]
    counted, _ = auditor.review(store.published)
    assert [(r.request_id, r.judge, r.verdict) for r in counted] == [
        ("r1", "human", "accept"), ("r2", "human", "reject"), ("r4", "human", "accept")]
    assert ours[3].verdict == "reject"  # the machine's verdict, replaced by the person's
