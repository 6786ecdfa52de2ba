"""CSV export and import of review verdicts, for reviewers who work offline.

Export writes the audits awaiting a person with an empty `verdict` column and the hash of the two answers.
Import checks every row against what is on `llm.audits` now and publishes only rows that still name that
audit, of that tenant, with those answers: a verdict given on a text that has since changed would otherwise
be counted for a text nobody read. A blank (or `skip`) verdict is left for later, not an error.

Cells that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR) get a leading `'`, as does a
cell that already starts with one; import removes it. The hash, not the text, ties a verdict to the answers.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from frugalstream.runtime.settings import UsageError
from frugalstream.schemas.audits import AuditRecord, ReviewVerdict
from frugalstream.tools.audit_review.queue import digest_of, verdict_for

COLUMNS = ("audit_id", "tenant", "kind", "task_type", "question", "served_answer", "baseline_answer",
           "answers_sha256", "verdict", "reviewer")
REQUIRED = ("audit_id", "tenant", "answers_sha256", "verdict")
_FORMULA = ("=", "+", "-", "@", "\t", "\r", "'")
MAX_CELL = 16 * 1024 * 1024


def cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA) else text


def uncell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


def write_export(records: Iterable[AuditRecord], path: Path) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in records:
            writer.writerow([cell(v) for v in (r.audit_id, r.tenant, r.kind, r.task_type, r.question,
                                               r.candidate.content, r.reference.content)] +
                            [digest_of(r), "", ""])
            rows += 1
    return rows


@dataclass(frozen=True)
class Row:
    number: int  # the spreadsheet's row number: the header is row 1
    values: Mapping[str, str]

    def get(self, column: str) -> str:
        return uncell(self.values.get(column) or "").strip()


def read_rows(path: Path) -> list[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL))
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if missing:
                raise UsageError(f"audit import: {path} has no column {', '.join(missing)} "
                                 f"(want the columns of `frugalstream audit export`: {', '.join(COLUMNS)})")
            return [Row(n, row) for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"audit import: cannot read {path}: {exc}") from None


@dataclass
class ImportCheck:
    verdicts: list[ReviewVerdict] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (row, audit id, reason)
    blank: int = 0


def check_rows(rows: Iterable[Row], audits: Mapping[str, AuditRecord], *, tenant: str | None = None,
               reviewer: str = "", now: float | None = None,
               judged: Collection[tuple[str, str, str]] = frozenset()) -> ImportCheck:
    """`audits`: the latest record of each audit id now on `llm.audits`; `judged`: (audit id, tenant, answers
    hash) of the verdicts on `llm.audits.reviews` (`queue.reviewed`). Every row is either published, left blank,
    or rejected with one reason. An audit a person already judged (on the page, or by an import since this file
    was exported) is refused as the page refuses it: a stale file must not overwrite a later verdict."""
    out = ImportCheck()
    seen: dict[str, int] = {}
    stamp = time.time() if now is None else now
    for row in rows:
        audit_id, verdict = row.get("audit_id"), row.get("verdict").lower()

        def reject(reason: str, row: Row = row, audit_id: str = audit_id) -> None:
            out.rejected.append((row.number, audit_id, reason))

        if not audit_id:
            reject("no audit_id")
            continue
        if verdict in ("", "skip"):
            out.blank += 1
            continue
        if verdict not in ("accept", "reject"):
            reject(f"bad verdict {row.get('verdict')[:40]!r} (want accept, reject, skip or blank)")
            continue
        if audit_id in seen:
            reject(f"the audit was already given a verdict on row {seen[audit_id]}")
            continue
        seen[audit_id] = row.number
        if tenant is not None and row.get("tenant") != tenant:
            reject(f"wrong tenant: the row is not {tenant}'s (importing with --tenant {tenant})")
            continue
        record = audits.get(audit_id)
        if record is None:
            reject("unknown audit: not on llm.audits" + (f" for tenant {tenant}" if tenant else ""))
            continue
        if record.tenant != row.get("tenant"):
            reject("wrong tenant: the audit belongs to another tenant than the row says")
            continue
        if digest_of(record) != row.get("answers_sha256"):
            reject("answers changed since export (answers_sha256 differs)")
            continue
        if record.judge == "human" or (audit_id, record.tenant, digest_of(record)) in judged:
            reject("already judged by a person since export")
            continue
        out.verdicts.append(verdict_for(record, "accept" if verdict == "accept" else "reject",
                                        row.get("reviewer") or reviewer, stamp))
    return out
