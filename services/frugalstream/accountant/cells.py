"""Report cells that carry names the producers chose (tenant, tag, model, task): never code in the reader's tool.

A tenant or tag is whatever a producer wrote, and a report is opened by people with more power than that
producer: a CSV cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is a formula to a spreadsheet
(`=HYPERLINK(...)` exfiltrates the sheet), and a Rich table reads `[...]` as markup (a tenant named `[/bold]`
crashed `frugalstream report`; `[red]acme[/red]` printed as a second "acme"). A bare CR ends a CSV row for
spreadsheets and Python's reader alike, so CSV lines end in CRLF: the writer then quotes a cell holding one. And
a name is shown to people as the characters it holds: an ESC drives the operator's terminal (clear the screen,
rewrite a row, OSC 52 sets the clipboard), a bidi override or a zero-width space makes a name pass for another.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_LINE_END = "\r\n"  # not "\n": the csv writer quotes a cell holding a CR only when its line end has one


def csv_safe(value: Any) -> Any:
    """A string cell a spreadsheet would run as a formula, prefixed with `'` (shown as text); numbers and every
    other value untouched, so amounts stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def visible(text: str) -> str:
    """`text` with each character that does not show as itself (controls, line breaks, bidi controls,
    zero-width and other format characters, spaces other than ' ') written as its Python escape (`\\u202e`)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def plain(value: Any) -> Text:
    """A table cell shown exactly as written: a `Text` is never parsed for markup or emoji codes, and hidden
    characters are shown as escapes (`visible`)."""
    value = visible(value) if isinstance(value, str) else value  # numbers print as themselves
    return Text(str(value))
