"""Writes `docs/SETTINGS.md` from the settings model: `python -m frugalstream.tools.settings_docs [--check]`.

Generated, not written by hand, so a new setting cannot ship undocumented: a unit test fails when the
committed file differs from what this renders, and when a field has no `description`.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from frugalstream.runtime.settings import Settings, TenantPolicy, TierModels

DOC = Path(__file__).resolve().parents[3] / "docs" / "SETTINGS.md"
_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", SecretStr: "secret"}
_BOUNDS = ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<"))


def type_text(tp: Any) -> str:
    """A reader's name for a type: allowed values for a Literal, `or unset` for an optional one."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is Annotated:  # a value with its own bounds: named by what it is
        return type_text(args[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_text(a) for a in rest) + (", or unset" if len(rest) < len(args) else "")
    if origin is tuple:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"table of {type_text(args[1])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"table ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " / ".join(f"`{m.value}`" for m in tp)
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def bounds_text(info: FieldInfo) -> str:
    parts = [f"{sign} {getattr(m, attr)}" for m in info.metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)]
    return f" ({', '.join(parts)})" if parts else ""


def default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else "`" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and value == "":
        return "empty"
    return f"`{value}`"


def _short(value: Any) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple | list) else str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(model: type[BaseModel], env: str | None, key: str) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        env_name = f"`{env}{name.upper()}`" if env is not None else "-"
        rows.append("| " + " | ".join(_cell(c) for c in (
            env_name, f"`{key}{name}`", type_text(info.annotation) + bounds_text(info), default_text(info),
            info.description or "")) + " |")
    return rows


_HEAD = "| environment variable | TOML key | type / allowed values | default | description |\n|---|---|---|---|---|"


def render() -> str:
    """The whole document; deterministic, so a test can compare it with the committed file."""
    return "\n".join([
        "# frugalstream settings",
        "",
        "<!-- Generated from frugalstream.runtime.settings by `python -m frugalstream.tools.settings_docs`; "
        "do not edit by hand. -->",
        "",
        "Every service and command reads the same settings, in this order of precedence: the environment "
        "(`FRUGAL_` prefix; nested values use `__`, e.g. `FRUGAL_TIERS__SMALL`; lists and tables are JSON, "
        "e.g. `FRUGAL_SEMANTIC_TASK_TYPES='[\"faq\"]'`), then the TOML file named by `FRUGAL_CONFIG` "
        "(default `frugalstream.toml` in the working directory), then the defaults below. "
        "`frugalstream config check` validates them without starting anything.",
        "",
        _HEAD, *_rows(Settings, "FRUGAL_", ""),
        "",
        "## Tiers",
        "",
        "`[tiers]` in TOML, or `FRUGAL_TIERS__SMALL='[\"gpt-4o-mini\"]'`. Each tier is an ordered list: the first "
        "model is used, the rest are fallbacks.",
        "",
        _HEAD, *_rows(TierModels, "FRUGAL_TIERS__", "tiers."),
        "",
        "## Tenant policy",
        "",
        "`[tenants.NAME]` in TOML, or all tenants at once as JSON in `FRUGAL_TENANTS`. Whatever crosses a "
        "tenant's wall is granted here, never by a request alone.",
        "",
        _HEAD, *_rows(TenantPolicy, None, "tenants.NAME."),
        "",
    ])


def undocumented() -> list[str]:
    return [f"{m.__name__}.{n}" for m in (Settings, TierModels, TenantPolicy)
            for n, f in m.model_fields.items() if not (f.description or "").strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frugalstream.tools.settings_docs", description=__doc__)
    parser.add_argument("--out", type=Path, default=DOC, help=f"default: {DOC}")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing")
    args = parser.parse_args(argv)
    if missing := undocumented():
        sys.stderr.write(f"settings without a description: {', '.join(missing)}\n")
        return 1
    text = render()
    if args.check:
        stale = not args.out.is_file() or args.out.read_text() != text
        if stale:
            sys.stderr.write(f"{args.out} is stale: run python -m frugalstream.tools.settings_docs\n")
        return int(stale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
