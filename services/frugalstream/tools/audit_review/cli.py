"""`frugalstream audit review | export | import`: the command line of the review tools."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from frugalstream.accountant.cells import visible
from frugalstream.runtime.logging import configure_logging
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import TASK_TYPES
from frugalstream.schemas.audits import DECISION_KINDS, AuditRecord
from frugalstream.tools.audit_review.csv_io import ImportCheck, Row, check_rows, read_rows, write_export
from frugalstream.tools.audit_review.queue import Filters, latest, pending, reviewed

if TYPE_CHECKING:  # the broker client and the web server load only for the commands that use them
    from frugalstream.tools.audit_review.store import KafkaReviewStore


def _store(settings: Settings) -> KafkaReviewStore:
    from frugalstream.tools.audit_review.store import KafkaReviewStore

    return KafkaReviewStore(settings)


def _settings(command: str) -> Settings:
    from frugalstream.tools.preflight import check_bootstrap

    settings = Settings()
    configure_logging("WARNING", fmt="console")
    check_bootstrap(settings, command=command)
    return settings


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(args.tenant, frozenset(args.kind or ()), frozenset(args.task_type or ()))


async def _pending(store: KafkaReviewStore, filters: Filters) -> list[AuditRecord]:
    records, reviews = await store.load(filters.tenant)
    return pending(records, reviews, filters)


async def _review(settings: Settings, args: argparse.Namespace) -> int:
    from frugalstream.tools.audit_review.app import ReviewSession
    from frugalstream.tools.audit_review.serve import serve_until_stopped

    store = _store(settings)
    items = await _pending(store, _filters(args))
    await store.start()
    try:
        session = ReviewSession(args.tenant, items, store, reviewer=args.reviewer)
        await serve_until_stopped(session, args.host, args.port)
    finally:
        await store.stop()
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    return asyncio.run(_review(_settings("audit review"), args))


def cmd_export(args: argparse.Namespace) -> int:
    items = asyncio.run(_pending(_store(_settings("audit export")), _filters(args)))
    rows = write_export(items, Path(args.out))
    print(f"wrote {rows} audits of {args.tenant} awaiting a verdict to {args.out} "
          "(fill the verdict column with accept or reject, then `frugalstream audit import`)")
    return 0


async def _import(settings: Settings, args: argparse.Namespace, rows: list[Row]) -> ImportCheck:
    store = _store(settings)
    records, reviews = await store.load(args.tenant)
    check = check_rows(rows, latest(records), tenant=args.tenant, reviewer=args.reviewer, judged=reviewed(reviews))
    if check.verdicts and not args.dry_run:
        await store.start()
        try:
            await store.publish(check.verdicts)
        finally:
            await store.stop()
    return check


def id_label(audit_id: str, limit: int = 80) -> str:
    """A row's audit id as printed to the operator's terminal: it is whatever the file says, so it is cut short
    and its control characters escaped (an ESC would drive the terminal; OSC 52 sets the clipboard)."""
    return visible(audit_id[:limit]) + ("..." if len(audit_id) > limit else "")


def cmd_import(args: argparse.Namespace) -> int:
    """Exit 1 when any row was rejected (the others are published all the same), else 0."""
    path = Path(args.csv)
    rows = read_rows(path)  # a bad file fails before the broker is asked anything
    check = asyncio.run(_import(_settings("audit import"), args, rows))
    for number, audit_id, reason in check.rejected:
        sys.stderr.write(f"{path}: row {number}{f' ({id_label(audit_id)})' if audit_id else ''} rejected: {reason}\n")
    done = "would publish" if args.dry_run else "published"
    print(f"{done} {len(check.verdicts)} verdicts to llm.audits.reviews; {len(check.rejected)} rows rejected; "
          f"{check.blank} left blank")
    return 1 if check.rejected else 0


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", required=True, help="review this tenant's audits only")
    p.add_argument("--kind", action="append", choices=DECISION_KINDS,
                   help="only this kind of decision (repeat for several; default: every kind)")
    p.add_argument("--task-type", action="append", choices=TASK_TYPES,
                   help="only this task type (repeat for several; default: every task type)")


def add_audit_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="people's verdicts on audits: review in a browser, or export / import CSV")
    audit = p.add_subparsers(dest="audit_command", required=True)
    r = audit.add_parser("review", help="serve a local page: request, served and baseline answers side by side; "
                                        "a accept, r reject, s skip")
    _add_filters(r)
    r.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    r.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    r.add_argument("--reviewer", default="", help="name recorded with each verdict")
    r.set_defaults(func=cmd_review)
    e = audit.add_parser("export", help="write the audits awaiting a verdict to CSV, with an empty verdict column")
    _add_filters(e)
    e.add_argument("--out", required=True, help="CSV file to write")
    e.set_defaults(func=cmd_export)
    i = audit.add_parser("import", help="check a filled-in export row by row and publish the valid verdicts")
    i.add_argument("csv", help="a CSV written by `frugalstream audit export`, verdict column filled in")
    i.add_argument("--tenant", help="refuse rows of any other tenant")
    i.add_argument("--reviewer", default="", help="name recorded with each verdict whose row names none")
    i.add_argument("--dry-run", action="store_true", help="check and report, publish nothing")
    i.set_defaults(func=cmd_import)
