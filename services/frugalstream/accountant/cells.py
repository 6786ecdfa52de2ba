"""Report cells that carry names the producers chose (tenant, tag, model, task): never code in the reader's tool.

A tenant or tag is whatever a producer wrote, and a report is opened by people with more power than that
producer: a CSV cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is a formula to a spreadsheet
(`=HYPERLINK(...)` exfiltrates the sheet), and a Rich table reads `[...]` as markup (a tenant named `[/bold]`
crashed `frugalstream report`; `[red]acme[/red]` printed as a second "acme").
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A string cell a spreadsheet would run as a formula, prefixed with `'` (shown as text); numbers and every
    other value untouched, so amounts stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def plain(value: Any) -> Text:
    """A table cell shown exactly as written: a `Text` is never parsed for markup or emoji codes."""
    return Text(str(value))
