"""Registers the bench subcommands; each bench lives in its own module and imports heavy code when run."""

from __future__ import annotations

from typing import Any

from frugalstream.tools.bench.audit import add_audit_bench
from frugalstream.tools.bench.dedupe import add_dedupe_bench
from frugalstream.tools.bench.embed import add_embed_bench
from frugalstream.tools.bench.http import add_http_bench
from frugalstream.tools.bench.pipeline import add_pipeline_bench
from frugalstream.tools.bench.route import add_route_bench
from frugalstream.tools.bench.summarize import add_summarize_bench


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks: dedupe, route, embed, summarize, pipeline, http, audit")
    kinds = bench.add_subparsers(dest="bench", required=True)
    add_dedupe_bench(kinds)
    add_route_bench(kinds)
    add_embed_bench(kinds)
    add_summarize_bench(kinds)
    add_pipeline_bench(kinds)
    add_http_bench(kinds)
    add_audit_bench(kinds)
