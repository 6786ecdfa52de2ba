"""`frugalstream` command line: serve, dev, demo, report, topics, bench, calibrate, backfill, prices, audit,
config check."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from frugalstream import __version__
from frugalstream.runtime.logging import configure_logging
from frugalstream.runtime.settings import Settings, UsageError, config_path

console = Console(stderr=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line (no usage block): raised as `UsageError`, which `main` reports."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


_ALLOWED = {
    "bool_parsing": "allowed: true/false, 1/0, yes/no, on/off",
    "int_parsing": "allowed: a whole number",
    "float_parsing": "allowed: a number",
}


def settings_error_line(exc: ValidationError) -> str:
    """One line for every invalid setting, each named as it was given: the env var, else the TOML key."""
    env = {k.upper() for k in os.environ}
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        names = ["FRUGAL_" + "__".join(loc[:n]).upper() for n in range(len(loc), 0, -1)]
        given = next((n for n in names if n in env), None)
        value = repr(err.get("input"))
        where = f"{given}={value}" if given else f"{'.'.join(loc)} = {value} in {config_path()}"
        hint = f" ({_ALLOWED[err['type']]})" if err["type"] in _ALLOWED else ""
        parts.append(f"setting {where}: {err['msg']}{hint}")
    return "; ".join(parts)


def _since(text: str) -> float:
    """Accepts an ISO date/time or a relative age like `24h`, `7d`, `30m`."""
    units = {"m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC).timestamp() - int(text[:-1]) * units[text[-1]]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give an ISO date/time (2026-01-31, 2026-01-31T08:00) or an age "
            "(30m, 24h, 7d)") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


async def _serve(names: Sequence[str]) -> int:
    from frugalstream.bootstrap import SERVICE_NAMES, Resources
    from frugalstream.runner import serve_forever
    from frugalstream.runtime import tracing

    settings = Settings()
    configure_logging(settings.log_level, log_prompts=settings.log_prompts, fmt=settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    resources = Resources(settings)
    tracing.setup_tracing(settings, "frugalstream-" + "-".join(names) if names else "frugalstream")
    try:
        await serve_forever(list(names) or list(SERVICE_NAMES), resources, stop)
    finally:
        resources.close()
        tracing.shutdown_tracing()  # flushes the spans still buffered
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from frugalstream.bootstrap import SERVICE_NAMES

    unknown = [n for n in args.services if n not in SERVICE_NAMES and n != "http"]
    if unknown:
        raise UsageError(f"serve: unknown service {', '.join(map(repr, unknown))} "
                         f"(allowed: {', '.join(SERVICE_NAMES)}, http; none means all but http)")
    from frugalstream.tools.preflight import check_bootstrap

    check_bootstrap(Settings(), command="serve")
    if "http" in args.services:
        from frugalstream.tools.http_serve import serve_with_http

        return asyncio.run(serve_with_http([n for n in args.services if n != "http"]))
    return asyncio.run(_serve(args.services))


def print_demo_report(report: dict[str, object]) -> None:
    table = Table(title="frugalstream demo: savings (simulated provider)")
    table.add_column("strategy")
    table.add_column("saved USD", justify="right")
    by_strategy = report["by_strategy"]
    assert isinstance(by_strategy, dict)
    for name, saved in sorted(by_strategy.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"${saved:,.6f}")
    table.add_section()
    table.add_row("baseline", f"${report['baseline_cost_usd']:,.6f}")
    table.add_row("actual", f"${report['actual_cost_usd']:,.6f}")
    table.add_row("savings", f"{report['savings_pct']:.1f}%")
    Console().print(table)
    Console().print(
        f"requests={report['requests']} responses={report['responses']} errors={report['errors']} "
        f"by_source={report['by_source']} wall={report['wall_time_s']} s"
    )
    if report.get("interactive_latency_ms_p50") is not None:
        Console().print(f"latency of interactive requests: p50={report['interactive_latency_ms_p50']:.0f} ms "
                        f"p99={report['interactive_latency_ms_p99']:.0f} ms (all requests: "
                        f"p50={report['latency_ms_p50']:.0f} ms p99={report['latency_ms_p99']:.0f} ms)")
    deferrable = report.get("deferrable")
    if isinstance(deferrable, dict) and deferrable.get("requests"):
        Console().print(f"deferrable requests (batch API): {deferrable['answered_before_deadline']} of "
                        f"{deferrable['requests']} answered before their deadline")


def cmd_demo(args: argparse.Namespace) -> int:
    from frugalstream.tools.demo import run_demo, write_json

    configure_logging("WARNING", fmt="console")
    report = asyncio.run(run_demo(limit=args.limit, rate=args.rate, latency_scale=args.latency_scale,
                                  state_dir=Path(args.state_dir)))
    print_demo_report(report)
    if args.json:
        write_json(report, Path(args.json))
        console.print(f"wrote {args.json}")
    console.print(f"the run's ledger is kept in {report['ledger']}; to see it: {report['report_command']}")
    return 0 if report["responses"] == report["requests"] and report["errors"] == 0 else 1


def cmd_dev(args: argparse.Namespace) -> int:
    from frugalstream.tools.devmode import dev_settings, main_async
    from frugalstream.tools.embedded_broker import BrokerBinaryNotFoundError, BrokerStartError

    settings = dev_settings(args.port)
    configure_logging(settings.log_level, log_prompts=settings.log_prompts, fmt=settings.log_format)
    try:
        return asyncio.run(main_async(settings, http_port=args.http_port))
    except (BrokerBinaryNotFoundError, BrokerStartError) as exc:
        console.print(f"[red]frugalstream dev: the embedded broker did not start on port {args.port}[/]: {exc}")
        return 1


def cmd_report(args: argparse.Namespace) -> int:
    from frugalstream.accountant.ledger import Ledger
    from frugalstream.accountant.report import build_report, render

    db = Path(args.db) if args.db else Settings().state_dir / "ledger.sqlite"
    if not db.exists():
        console.print(f"[red]no ledger at {db}[/]: run the accountant first or pass --db")
        return 2
    try:
        with Ledger(db) as ledger:
            text = render(build_report(ledger, by=args.by, since=args.since), args.format)
    except sqlite3.DatabaseError as exc:  # --db named a file that is not SQLite: a CSV, a truncated copy
        raise UsageError(f"report: {db} is not a readable ledger ({exc}): pass --db with the accountant's "
                         "ledger.sqlite") from None
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:  # a missing directory, a read-only place: one line naming --out, no traceback
            raise UsageError(f"report --out {args.out}: cannot write it ({exc.strerror or exc})") from None
        console.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from frugalstream.runtime.topics_admin import ensure_topics
    from frugalstream.schemas.topics import ALL_TOPICS, COMPACTED
    from frugalstream.tools.preflight import check_bootstrap

    settings = Settings()
    check_bootstrap(settings, command="topics")
    specs = {settings.topic(n): args.partitions for n in ALL_TOPICS}
    compacted = {settings.topic(n) for n in COMPACTED}
    created = asyncio.run(ensure_topics(settings, specs, compacted=compacted, replication=args.replication))
    console.print(f"created {len(created)} topics ({len(specs) - len(created)} already existed)")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Loads the settings (environment and TOML file) and starts nothing: a bad value fails in `main`. The key
    of every provider in use is read too, as the services read it at start: a missing key file fails here
    (`MissingKeyFileError` names the setting), not in a crash-looping pod."""
    from frugalstream.gateway.app import providers_in_use
    from frugalstream.resources import Resources

    settings = Settings()
    try:
        catalog = Resources(settings).catalog  # which provider a model is at
    except (OSError, ValueError) as exc:
        raise UsageError(f"setting FRUGAL_PRICE_CATALOG or FRUGAL_PRICE_OVERRIDES: {exc}") from exc
    keys = {"openai": (settings.openai_api_key, settings.openai_api_key_file),
            "anthropic": (settings.anthropic_api_key, settings.anthropic_api_key_file)}
    for name in sorted(providers_in_use(settings, catalog) & keys.keys()):
        settings.secret(*keys[name])
    _warn_predictable_sampling(settings)
    print("config ok")
    return 0


def _warn_predictable_sampling(settings: Settings) -> None:
    """Reads the audit sampling secret as the sampling services do (a missing file fails here); unset while
    audits sample, a producer can compute which request ids are audited and pick ids that never are."""
    auditing = settings.audit_rate > 0 or any(rate > 0 for rate in settings.audit_rates.values())
    if settings.audit_sampling_key() is None and auditing:
        print("warning: audit sampling is predictable: set FRUGAL_AUDIT_SAMPLING_SECRET (or "
              "FRUGAL_AUDIT_SAMPLING_SECRET_FILE), the same for every service, so producers cannot choose which "
              "requests are audited", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="frugalstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"frugalstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run services against FRUGAL_KAFKA_BOOTSTRAP")
    p.add_argument("services", nargs="*", help="classifier dedupe gateway summarizer accountant (default: all), "
                                               "and http: the OpenAI-compatible HTTP entry")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="embedded broker + every service + the bundled workload, then the report")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--rate", type=float, default=25.0, help="requests per second to produce (default 25)")
    p.add_argument("--latency-scale", type=float, default=0.05, help="scale of simulated provider latency")
    p.add_argument("--state-dir", default=".frugalstream-demo",
                   help="where the run's ledger and state are kept (default .frugalstream-demo; replaced each run)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dev", help="local mode: embedded broker on 127.0.0.1:PORT, every topic and service")
    p.add_argument("--port", type=int, default=9092, help="broker port on 127.0.0.1 (default 9092)")
    p.add_argument("--http-port", type=int, help="also run the OpenAI-compatible HTTP entry on 127.0.0.1:PORT")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("report", help="spend, baseline and savings from the accountant's ledger")
    p.add_argument("--db", help="ledger path (default: $FRUGAL_STATE_DIR/ledger.sqlite)")
    p.add_argument("--since", type=_since, help="ISO time or age like 24h / 7d")
    p.add_argument("--by", choices=["tenant", "model", "task", "strategy", "tag"], default="tenant")
    p.add_argument("--format", choices=["table", "csv", "json", "html"], default="table")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("check", help="validate the environment and TOML settings without starting anything")
    p.set_defaults(func=cmd_config_check)

    p = sub.add_parser("topics", help="create every frugalstream topic (compacted where the design says)")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--replication", type=int, default=3)
    p.set_defaults(func=cmd_topics)

    from frugalstream.tools.acls import add_acls_parser
    from frugalstream.tools.audit_review.cli import add_audit_parser
    from frugalstream.tools.backfill import add_backfill_parser
    from frugalstream.tools.bench.cli import add_bench_parser
    from frugalstream.tools.calibrate import add_calibrate_parser
    from frugalstream.tools.prices import add_prices_parser

    add_calibrate_parser(sub)
    add_backfill_parser(sub)
    add_bench_parser(sub)
    add_prices_parser(sub)
    add_audit_parser(sub)
    add_acls_parser(sub)
    return parser


def _fail(message: str) -> int:
    line = " ".join(message.split())
    sys.stderr.write((line if line.startswith("frugalstream") else f"frugalstream: {line}") + "\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. Every bad argument, setting or input file ends here as one line on stderr and exit
    code 2, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
    except UsageError as exc:
        return _fail(str(exc))
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        return _fail(settings_error_line(exc))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
