"""Registers the bench subcommands; each bench lives in its own module and is imported only when run."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks: dedupe, route, summarize, pipeline")
    kinds = bench.add_subparsers(dest="bench", required=True)
    _ = kinds
    bench.set_defaults(func=lambda _args: _missing())


def _missing() -> int:
    raise SystemExit("choose a bench: frugalstream bench --help")


__all__ = ["add_bench_parser", "argparse"]
