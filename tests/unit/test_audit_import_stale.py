"""A CSV exported before a person judged an audit (on the page, or by another import) cannot overwrite that later
verdict: `audit import` refuses the row as the page refuses the audit, whether the audit service has counted the
verdict yet (the record's judge is `human`) or it is only on `llm.audits.reviews`."""

from __future__ import annotations

import csv
from pathlib import Path

from frugalstream.audit.logic import Auditor
from frugalstream.llm.judges import MatchJudge
from frugalstream.tools.audit_review.csv_io import check_rows, read_rows, write_export
from frugalstream.tools.audit_review.queue import latest, reviewed, verdict_for
from tests.unit.test_audit_review import SETTINGS, answered, judged


def _accept_all(path: Path) -> None:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "verdict": "accept"} for row in rows)


async def test_an_import_never_overwrites_a_verdict_a_person_gave_since_the_export(tmp_path: Path) -> None:
    auditor = Auditor(SETTINGS, {"match": MatchJudge()})
    records = await judged(auditor, answered("r1", "a", "ref"), answered("r2", "b", "ref"), answered("r3", "c", "x"))
    out = tmp_path / "reviews.csv"
    write_export(records, out)
    _accept_all(out)
    on_page = [verdict_for(records[0], "reject"), verdict_for(records[1], "reject")]
    counted, _ = auditor.review(on_page[:1])  # r1's verdict is counted already; r2's is only on the reviews topic
    now = latest([*records, *counted])
    check = check_rows(read_rows(out), now, judged=reviewed(on_page[1:]))
    assert [v.audit_id for v in check.verdicts] == [records[2].audit_id]
    assert [reason for _, _, reason in check.rejected] == ["already judged by a person since export"] * 2
