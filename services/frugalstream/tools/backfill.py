"""`frugalstream backfill FILE --text-col COL ...`: submit a summarization backfill and wait for its results.

Reads CSV, JSON lines or Parquet; publishes the job to `llm.summarize.jobs` in parts that fit a Kafka
message; shows a progress bar fed by `llm.summarize.progress`; writes one row per original item (in the
file's order) when done; prints the job report. Parts list each distinct text's first occurrence first, so
the early parts carry every distinct item and fill whole packs, and later parts are answered from the
store without a model call. A row that cannot be an item (not valid JSON, over a limit, no id, an id used
before) is reported with its line and reason and not sent; the rest run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from frugalstream.accountant.cells import csv_safe
from frugalstream.llm.cache_keys import normalize_text
from frugalstream.runtime.broker import make_broker
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings, UsageError
from frugalstream.schemas import SummarizeItem, SummarizeJob, SummarizeProgress, wire_bytes
from frugalstream.schemas import topics as t
from frugalstream.tools.job_report import JobFollower, JobOutcome, job_report
from frugalstream.tools.preflight import check_bootstrap
from frugalstream.tools.prices import configured_catalog
from frugalstream.tools.waiting import WaitWatch

PART_ITEMS = 1_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
OUT_FIELDS = ("item_id", "status", "summary", "source", "reused_from", "model", "error", "simulated")


def parse_duration(text: str) -> int:
    """`24h`, `30m`, `7d`, `90s` or plain seconds."""
    text = text.strip().lower()
    if text[-1:] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def _deadline(text: str) -> int:
    """OverflowError too: `1e400h` is an infinite number of seconds, which no whole number holds."""
    try:
        return parse_duration(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give seconds (3600) or a number with s, m, h or d (90s, 30m, 24h, 7d)"
        ) from None


def text_encoding(name: str) -> str:
    """An `--encoding` Python can decode text with, checked when the arguments are parsed: a misspelt name
    (`utf-9`) or a codec that is not a text encoding (`base64`) would otherwise raise a LookupError only once
    the file is read."""
    try:
        b"a".decode(name, errors="replace")  # one byte: an empty input skips the codec lookup
    except LookupError:
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a text encoding Python knows (e.g. utf-8, cp1252, latin-1, utf-16)") from None
    return name


def _parquet() -> Any:
    """pyarrow (170 MB) is the `parquet` extra: most backfills are CSV or JSON lines."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError("Parquet files need pyarrow: pip install 'frugalstream[parquet]'") from None
    return pyarrow


@dataclass(frozen=True)
class Skipped:
    """A row of the input file that is not sent, and why. `line` counts from 1: the line where a CSV record or a
    JSON line starts, or the Parquet row."""

    line: int
    reason: str
    empty: bool = False  # no text: nothing to summarize, so reported (as a count) but not an error


class Loaded(list[SummarizeItem]):
    """The items to send in file order (the list itself), every row not sent with its reason, how many records
    were read, and what `Skipped.line` counts ("line", or "row" for Parquet)."""

    def __init__(self, items: Sequence[SummarizeItem], skipped: Sequence[Skipped] = (), rows: int = 0,
                 unit: str = "line") -> None:
        super().__init__(items)
        self.skipped, self.rows, self.unit = tuple(skipped), rows, unit

    @property
    def bad(self) -> list[Skipped]:
        """The rows skipped for a defect (not for an empty text): the command fails on any of them."""
        return [s for s in self.skipped if not s.empty]


Record = tuple[int, dict[str, Any] | str]  # (line, the row's fields, or why it is not a row)


def _decode(path: Path, encoding: str | None) -> str:
    """The file's text without a byte order mark, whatever `encoding` is given (`utf-8` keeps it): a BOM is never
    data, and left in it hid the first column's name and made the first JSON line invalid."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding or "utf-8-sig").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        if encoding is None:
            return raw.decode("cp1252", errors="replace")
        raise UsageError(f"{path} is not {encoding} text (byte {exc.start}): give the file's --encoding") from None


def _json_lines(text: str) -> tuple[list[Record], list[str]]:
    """Split on `\\n` only: U+2028 and friends are valid inside a JSON string, so they never end a line."""
    records: list[Record] = []
    columns: dict[str, None] = {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            where = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else "nested too deep"
            records.append((n, f"not valid JSON: {where}"))
            continue
        if not isinstance(value, dict):
            records.append((n, f"not a JSON object but {type(value).__name__}"))
            continue
        columns.update(dict.fromkeys(map(str, value)))
        records.append((n, value))
    return records, list(columns)


def _csv_records(text: str) -> tuple[list[Record], list[str]]:
    """Records with the line each starts on (a quoted field may span lines, and keeps its line breaks). The
    field size limit is lifted for the read: a long text is then judged by the item's own limit and reported
    on its line, instead of a csv error ending the whole file."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next((row for row in reader if row), [])
        records: list[Record] = []
        end = reader.line_num
        for row in reader:
            if row:
                records.append((end + 1, {k: row[i] if i < len(row) else None for i, k in enumerate(header)}))
            end = reader.line_num
        return records, header
    finally:
        csv.field_size_limit(limit)


def read_records(path: Path, encoding: str | None = None) -> tuple[list[Record], list[str], str]:
    """Every record of a CSV (UTF-8, else cp1252, the usual legacy export), JSON lines or Parquet file, with its
    line, the file's columns, and what the line numbers count. A record that cannot be read is kept as the
    reason why, so one bad line never costs the rest of the file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pa = _parquet()
        try:
            table = pa.parquet.read_table(path)
        except pa.ArrowException as exc:  # not Parquet at all (a CSV renamed), truncated, or unsupported
            raise UsageError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
        return list(enumerate(table.to_pylist(), start=1)), list(table.column_names), "row"
    text = _decode(path, encoding)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return (*_json_lines(text), "line")
    return (*_csv_records(text), "line")


def read_rows(path: Path, encoding: str | None = None) -> list[dict[str, Any]]:
    """Every row, or a UsageError naming the first line that is not one (`load_items` skips and reports it)."""
    records = read_records(path, encoding)[0]
    if bad := next(((line, row) for line, row in records if isinstance(row, str)), None):
        raise UsageError(f"{path}:{bad[0]}: {bad[1]}")
    return [row for _, row in records if not isinstance(row, str)]


def item_bytes(item: SummarizeItem) -> int:
    """What an item adds to a job part on the wire (its JSON and a separator)."""
    return wire_bytes(item) + 2


def _invalid(exc: ValidationError, fields: dict[str, str]) -> str:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "item"
    size = f" (it has {len(fields[name]):,})" if name in fields else ""
    return f"{name}: {err['msg']}{size}"


def load_items(path: Path, text_col: str, id_col: str | None, encoding: str | None = None, *,
               max_item_bytes: int | None = None) -> Loaded:
    """Each row with a text is an item; ids default to the row number (counting every record, so no id depends
    on another line being readable). A row that cannot be one is skipped with its line and why (not valid JSON,
    no id, over an item limit or `max_item_bytes`, an id an earlier row has), one with an empty text as empty:
    nothing is dropped unreported, and a bad row never costs the others."""
    records, columns, unit = read_records(path, encoding)
    for flag, col in (("--text-col", text_col), ("--id-col", id_col)):
        if columns and col is not None and col not in columns:
            raise UsageError(f"{flag} {col!r} is not a column of {path} (columns: {', '.join(map(str, columns))})")
        if col is not None and (count := columns.count(col)) > 1:  # a row would keep the last one, silently
            raise UsageError(f"{flag} {col!r} names {count} columns of {path}: rename all but the one to use")
    items: list[SummarizeItem] = []
    skipped: list[Skipped] = []
    first: dict[str, int] = {}
    for n, (line, row) in enumerate(records):
        if isinstance(row, str):
            skipped.append(Skipped(line, row))
            continue
        text = row.get(text_col)
        if text is None or not str(text).strip():
            skipped.append(Skipped(line, f"empty {text_col!r}", empty=True))
            continue
        raw_id = row.get(id_col) if id_col else n
        if raw_id is None or str(raw_id) == "":
            skipped.append(Skipped(line, f"no {id_col!r} value"))
            continue
        fields = {"id": str(raw_id), "text": str(text)}
        try:
            item = SummarizeItem(**fields)
        except ValidationError as exc:
            skipped.append(Skipped(line, _invalid(exc, fields)))
            continue
        if max_item_bytes is not None and (size := item_bytes(item)) > max_item_bytes:
            skipped.append(Skipped(line, f"{size:,} bytes as JSON, over the {max_item_bytes:,} a job part may carry "
                                         "(max_message_bytes)"))
        elif item.id in first:
            skipped.append(Skipped(line, f"id {item.id!r} already used on {unit} {first[item.id]}"))
        else:
            first[item.id] = line
            items.append(item)
    return Loaded(items, skipped, len(records), unit)


def report_skipped(loaded: Loaded, path: Path, text_col: str, console: Console) -> None:
    """Each bad row on a line of its own (`FILE:LINE: skipped: reason`); rows with an empty text as one count."""
    for s in loaded.bad:
        console.print(f"{path}:{s.line}: skipped: {s.reason}", markup=False, highlight=False, soft_wrap=True)
    empty = [s.line for s in loaded.skipped if s.empty]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        console.print(f"{path}: {len(empty)} {loaded.unit}(s) with an empty {text_col!r} not sent "
                      f"({loaded.unit}s {shown})", markup=False, highlight=False, soft_wrap=True)


def split_job(job_id: str, tenant: str, instruction: str, items: Sequence[SummarizeItem], *,
              model: str | None = None, deadline_s: int | None = None, near_duplicates: bool = False,
              max_output_tokens: int = 120, part_items: int = PART_ITEMS, max_bytes: int = 900_000,
              tags: dict[str, str] | None = None) -> list[SummarizeJob]:
    """Distinct-first order, then parts bounded by item count and message size. ValueError if an item id repeats
    (results are keyed by item id) or an item cannot fit a part. The parts' `run_id` is a digest of the items:
    the same job id over another file is another run (never answered with this one's results), the same file
    again is this run (answered from what it already did)."""
    repeated = [i for i, n in Counter(item.id for item in items).items() if n > 1]
    if repeated:
        raise ValueError(f"item ids must be unique within a job: {len(repeated)} repeated, e.g. {repeated[:3]}")
    seen: set[str] = set()
    first: list[SummarizeItem] = []
    repeats: list[SummarizeItem] = []
    for item in items:
        key = normalize_text(item.text)
        (repeats if key in seen else first).append(item)
        seen.add(key)
    parts: list[list[SummarizeItem]] = [[]]
    size = 0
    for item in (*first, *repeats):
        if (cost := item_bytes(item)) > max_bytes:
            raise ValueError(f"item {item.id!r} is {cost:,} bytes, over the {max_bytes:,} of a part")
        if parts[-1] and (len(parts[-1]) >= part_items or size + cost > max_bytes):
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += cost
    common: dict[str, Any] = {"job_id": job_id, "tenant": tenant, "instruction": instruction, "model": model,
                              "deadline_s": deadline_s, "near_duplicates": near_duplicates,
                              "max_output_tokens": max_output_tokens, "tags": tags or {},
                              "parts": len(parts), "total_items": len(items), "run_id": items_digest(items)}
    return [SummarizeJob(items=tuple(p), part=n, **common) for n, p in enumerate(parts)]


def items_digest(items: Sequence[SummarizeItem]) -> str:
    """Ids and texts in order: what a run answers (the job's other fields are in its `run_key` already)."""
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        h.update(json.dumps([item.id, item.text]).encode() + b"\n")
    return h.hexdigest()


async def publish_parts(settings: Settings, parts: Sequence[SummarizeJob]) -> None:
    broker = make_broker(settings, client_suffix="-backfill")
    await broker.connect()
    try:
        await Publisher(broker, settings).publish_all([Out(t.SUMMARIZE_JOBS, p, key=p.job_id) for p in parts])
    finally:
        await broker.stop()


async def run_backfill(settings: Settings, parts: Sequence[SummarizeJob], *, timeout_s: float = 24 * 3600.0,
                       console: Console | None = None) -> JobOutcome:
    """Publishes the parts and follows the job until every item has a result, showing done/total, the rate and,
    when nothing arrives, what it is waiting for."""
    console = console or Console(stderr=True)
    total = parts[0].total_items or len(parts[0].items)
    follower = JobFollower.of_run(settings, parts)
    await follower.start()
    try:
        await publish_parts(settings, parts)
        return await follow_with_progress(follower, total, timeout_s, console, settings.kafka_bootstrap)
    finally:
        await follower.stop()


async def follow_with_progress(follower: JobFollower, total: int, timeout_s: float, console: Console,
                               bootstrap: str, clock: Callable[[], float] = time.monotonic) -> JobOutcome:
    watch = WaitWatch(total, clock(), hint=f"is `frugalstream serve summarizer` running against {bootstrap}?")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[calls]} model calls"), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=console, transient=False) as bar:
        task = bar.add_task(f"summarizing {follower.job_id}", total=total, calls=0, status="")

        def update(progress: SummarizeProgress | None, results: int) -> None:
            done = min(max(results, progress.done_items if progress else 0), total)
            status, line = watch.observe(done, progress is not None or results > 0, clock())
            bar.update(task, completed=done, calls=progress.model_calls if progress else 0, status=status)
            if line is not None:
                bar.console.print(f"backfill {follower.job_id}: {line}")

        return await follower.follow(total, timeout_s, update)


def write_results(path: Path, outcome: JobOutcome, ids: Sequence[str]) -> None:
    """One row per original item in input order; the format follows the extension (csv, parquet, else jsonl). A
    summary is model output an item's text can steer, and ids come from the file: a CSV cell a spreadsheet would
    run as a formula is written as text (`cells.csv_safe`); the other formats keep every value as it is."""
    rows = []
    for item_id in ids:
        result = outcome.results.get(item_id)
        row = result.model_dump(include=set(OUT_FIELDS)) if result else {"item_id": item_id, "status": "missing"}
        rows.append({k: row.get(k) for k in OUT_FIELDS})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        pa = _parquet()
        pa.parquet.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix.lower() == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=OUT_FIELDS)
            writer.writeheader()
            writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def print_report(report: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    table = Table(title="summarization job report" + (" (simulated provider)" if report.get("simulated") else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("items", "unique_items", "model_calls", "input_tokens", "output_tokens", "errors"):
        table.add_row(key, str(report.get(key)))
    table.add_section()
    table.add_row("baseline cost", f"${report['baseline_cost_usd']:,.6f}")
    table.add_row("actual cost", f"${report['actual_cost_usd']:,.6f}")
    table.add_row("savings", f"{report['savings_pct']:.2f}%")
    for strategy, saved in report["by_strategy"].items():
        table.add_row(f"  saved by {strategy}", f"${saved:,.6f}")
    console.print(table)


_JOB_FLAGS = {"job_id": "--job-id", "tenant": "--tenant", "instruction": "--instruction", "model": "--model",
              "deadline_s": "--deadline", "max_output_tokens": "--max-output-tokens"}


def check_job_args(args: argparse.Namespace, job_id: str) -> None:
    """The job's own fields, checked against the `SummarizeJob` contract before the file is read or Kafka is
    asked anything: a value the contract refuses (an empty tenant, a job id over its length, 0 output tokens)
    is a UsageError naming the flag, not a ValidationError once the parts are built. A one-item probe job
    carries the values, so the bounds stay the contract's own."""
    try:
        SummarizeJob(job_id=job_id, tenant=args.tenant, instruction=args.instruction, model=args.model,
                     deadline_s=args.deadline, max_output_tokens=args.max_output_tokens,
                     items=(SummarizeItem(id="probe", text="probe"),))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            flag = _JOB_FLAGS.get(str(err["loc"][0]) if err["loc"] else "", "job")
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
            problems.append(f"{flag} {shown}: {err['msg']}")
        raise UsageError(f"backfill {'; '.join(problems)}") from None


def cmd_backfill(args: argparse.Namespace) -> int:
    path = Path(args.file)
    job_id = args.job_id or f"backfill-{uuid.uuid4().hex[:12]}"
    check_job_args(args, job_id)
    if not path.is_file():
        raise UsageError(f"backfill FILE: {path} does not exist or is not a file (give a CSV, JSON lines or "
                         "Parquet file)")
    settings = Settings()
    console = Console(stderr=True)
    part_bytes = int(settings.max_message_bytes * 0.9)
    loaded = load_items(path, args.text_col, args.id_col, args.encoding, max_item_bytes=part_bytes)
    report_skipped(loaded, path, args.text_col, console)
    check_bootstrap(settings, command="backfill")
    catalog = configured_catalog(settings)[1]
    items = list(loaded)
    if not items:
        console.print(f"[red]no non-empty {args.text_col!r} values to send in {path}[/]")
        return 2
    parts = split_job(job_id, args.tenant, args.instruction, items, model=args.model,
                      deadline_s=args.deadline,
                      near_duplicates=args.near_duplicates, max_output_tokens=args.max_output_tokens,
                      max_bytes=part_bytes)
    console.print(f"job {job_id}: {len(items)} items in {len(parts)} part(s) -> {settings.topic(t.SUMMARIZE_JOBS)}")
    outcome = asyncio.run(run_backfill(settings, parts, timeout_s=args.timeout))
    report = {"job_id": job_id, **job_report(outcome, catalog)}
    print_report(report, console)
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}.summaries.jsonl")
    write_results(out, outcome, [i.id for i in items])
    console.print(f"wrote {out}")
    complete = len(outcome.results) == len(items)
    if not complete:
        console.print(f"[red]{len(items) - len(outcome.results)} items without a result before the timeout[/]")
    if loaded.bad:
        console.print(f"{len(loaded.bad)} of {loaded.rows} {loaded.unit}s of {path} skipped, not sent (each listed "
                      "above with its reason)", style="red", markup=False, highlight=False, soft_wrap=True)
    return 0 if complete and report["errors"] == 0 and not loaded.bad else 1


def add_backfill_parser(sub: Any) -> None:
    p = sub.add_parser("backfill", help="summarize a CSV / JSON lines / Parquet file through the summarizer")
    p.add_argument("file")
    p.add_argument("--text-col", required=True)
    p.add_argument("--id-col", help="item ids (default: row number)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--deadline", type=_deadline,
                   help="how long the job may take, e.g. 24h: long deadlines use batch APIs")
    p.add_argument("--model", help="model to use (default: the small tier; also the baseline when set)")
    p.add_argument("--out", help="results file (.jsonl, .csv or .parquet; default FILE.summaries.jsonl)")
    p.add_argument("--near-duplicates", action="store_true", help="also reuse verified near-duplicate items")
    p.add_argument("--max-output-tokens", type=int, default=120)
    p.add_argument("--tenant", default="default")
    p.add_argument("--job-id")
    p.add_argument("--encoding", type=text_encoding,
                   help="CSV / JSON lines encoding (default: UTF-8, falling back to cp1252)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the results")
    p.set_defaults(func=cmd_backfill)
