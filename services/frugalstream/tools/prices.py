"""`frugalstream prices update | show MODEL`: refresh the dated price catalog and say where each rate came from.

`update` writes the catalog services load at start (`FRUGAL_PRICE_CATALOG`, else `<state_dir>/prices.json`);
the shipped catalog stays the fallback when none was written. `show` answers finance's first question about a
number: which rate, from which source, taken on which day.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from frugalstream.llm.pricing.catalog import PriceCatalog, UnknownModelError, age_days
from frugalstream.llm.pricing.litellm import LiteLLMMap
from frugalstream.llm.pricing.update import UPDATED_NAME, build_catalog, catalog_file, write_catalog
from frugalstream.runtime.settings import Settings, UsageError

KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")
# What a rate falls back to when its entry does not list it (see catalog._rates).
_DEFAULTS = {"cached_input": "input", "cache_write": "input", "reasoning": "output"}


def configured_catalog(settings: Settings) -> tuple[Path, PriceCatalog]:
    """The catalog the services would load with these settings, or a one-line error naming the setting."""
    path = catalog_file(settings.price_catalog, settings.state_dir)
    if not path.is_file():
        raise UsageError(f"setting FRUGAL_PRICE_CATALOG={str(path)!r}: no such file (run `frugalstream prices "
                         "update`, or unset it to use the shipped catalog)")
    if settings.price_overrides is not None and not settings.price_overrides.is_file():
        raise UsageError(f"setting FRUGAL_PRICE_OVERRIDES={str(settings.price_overrides)!r}: no such file")
    try:
        return path, PriceCatalog.load(path, overrides=settings.price_overrides)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UsageError(f"price catalog {path} cannot be read: {exc}") from None


def _source(catalog: PriceCatalog, model: str, field: str) -> str:
    entry = catalog.entry(model)
    if field not in entry:
        return "not listed"
    src = catalog.source_of(model, field)
    return f"{src.label}, {src.as_of}" if src.as_of else src.label


def origin(entry: Any, batch: bool, kind: str) -> str:
    """The entry field a rate comes from, following the catalog's defaults: an unlisted cache or reasoning
    rate is the input / output rate, and in batch mode it follows the batch discount only when the standard
    rate was not listed either."""
    field = f"batch_{kind}" if batch else kind
    if field in entry or kind in ("input", "output"):
        return field
    if batch and kind in entry:
        return kind
    base = _DEFAULTS[kind]
    return f"batch_{base}" if batch else base


def explain(catalog: PriceCatalog, model: str) -> dict[str, Any]:
    """Every effective rate of `model` with the source (and day) of the entry field it comes from."""
    name = catalog.resolve(model)
    price, entry = catalog.rates(name), catalog.entry(name)
    rows: list[dict[str, Any]] = []
    for mode, rates in (("standard", price.standard), ("batch", price.batch)):
        for kind in KINDS if rates is not None else ():
            field = origin(entry, mode == "batch", kind)
            if "gpu_hour_usd" in entry:
                note = (f"${entry['gpu_hour_usd']}/GPU-hour at {entry.get('tokens_per_s')} tokens/s "
                        f"({_source(catalog, name, 'gpu_hour_usd')})")
            elif field != (f"batch_{kind}" if mode == "batch" else kind):
                note = f"= {field} (not listed; {_source(catalog, name, field)})"
            else:
                note = _source(catalog, name, field)
            rows.append({"mode": mode, "kind": kind, "usd_per_1m": str(getattr(rates, kind)), "source": note})
    long = price.long_context
    if long is not None:
        src = _source(catalog, name, "long_context")
        for mode, rates in (("long_context", long[1]), ("long_context_batch", long[2])):
            for kind in KINDS if rates is not None else ():
                rows.append({"mode": f"{mode} (> {long[0]} prompt tokens)", "kind": kind,
                             "usd_per_1m": str(getattr(rates, kind)), "source": src})
    return {"model": model, "catalog_name": name, "provider": price.provider, "context_window": price.context_window,
            "catalog_version": catalog.version, "catalog_as_of": catalog.as_of,
            "catalog_age_days": age_days(catalog.as_of), "rates": rows}


def show_text(info: dict[str, Any]) -> str:
    age = info["catalog_age_days"]
    head = (f"{info['model']} -> {info['catalog_name']} ({info['provider']}, context {info['context_window']})\n"
            f"catalog {info.get('catalog_file', '')} {info['catalog_version']}, "
            f"prices as of {info['catalog_as_of'] or 'unknown'}"
            + (f" ({age} days old)" if age is not None else "") + "\nUSD per 1M tokens:\n")
    width = max(len(f"{r['mode']} {r['kind']}") for r in info["rates"])
    lines = [f"  {r['mode'] + ' ' + r['kind']:<{width}}  {Decimal(r['usd_per_1m']).normalize():>12f}  {r['source']}"
             for r in info["rates"]]
    return head + "\n".join(lines) + "\n"


def cmd_prices_show(args: argparse.Namespace) -> int:
    path, catalog = configured_catalog(Settings())
    try:
        info = {**explain(catalog, args.model), "catalog_file": str(path)}
    except UnknownModelError as exc:
        raise UsageError(f"prices show: {exc}") from None
    print(json.dumps(info, indent=2) if args.json else show_text(info), end="" if not args.json else "\n")
    return 0


def changed_models(old: PriceCatalog, new: PriceCatalog) -> list[str]:
    """Models of the old catalog whose rates differ (or vanished) in the new one."""
    return [m for m in old.models if not new.has(m) or old.rates(m) != new.rates(m)]


def cmd_prices_update(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        src = LiteLLMMap.read(Path(args.source)) if args.source else LiteLLMMap.installed()
    except (LookupError, OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"prices update: {exc}") from None
    if not isinstance(src.doc, Mapping):  # LiteLLM's map is one object of model name -> entry
        raise UsageError(f"prices update: {src.path} is not a price map (a JSON object of model entries) but a "
                         f"JSON {type(src.doc).__name__}")
    out = Path(args.out) if args.out else settings.price_catalog or settings.state_dir / UPDATED_NAME
    try:  # the catalog it replaces: read before writing, so a corrupt one is named and left as it is
        before = PriceCatalog.load(out) if out.is_file() else None
    except (ValueError, OSError) as exc:  # ValueError covers bad JSON and a document that is not a catalog
        raise UsageError(f"prices update --out {out}: the catalog there cannot be read ({str(exc)[:200]}); move "
                         "it away or give another --out") from None
    today = args.date or datetime.now(UTC).date().isoformat()
    try:
        new = write_catalog(build_catalog(src, today), out)
    except OSError as exc:  # a directory, a path under a file, no permission
        raise UsageError(f"prices update --out {out}: cannot write there ({exc.strerror or exc})") from None
    print(f"wrote {out}: {len(new.models)} models, version {new.version}, from {src.label}")
    if before is not None:
        changed = changed_models(before, new)
        print(f"{len(changed)} models changed rates since {before.version}" + (
            f": {', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''}" if changed else ""))
    if args.out and settings.price_catalog is None and out.resolve() != (settings.state_dir / UPDATED_NAME).resolve():
        print(f"services load it with FRUGAL_PRICE_CATALOG={out}")
    else:
        print("services load it at their next start")
    return 0


def _date(text: str) -> str:
    try:
        return datetime.strptime(text, "%Y-%m-%d").date().isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: give YYYY-MM-DD") from None


def add_prices_parser(sub: Any) -> None:
    p = sub.add_parser("prices", help="the price catalog: update it from LiteLLM's map, show a model's rates")
    prices = p.add_subparsers(dest="prices_command", required=True)
    u = prices.add_parser("update", help="import LiteLLM's price map with the project's overrides on top")
    u.add_argument("--source", help="a copy of model_prices_and_context_window.json (default: the installed "
                                    "litellm package's)")
    u.add_argument("--out", help="catalog to write (default: $FRUGAL_PRICE_CATALOG, else "
                                 "$FRUGAL_STATE_DIR/prices.json)")
    u.add_argument("--date", type=_date, help="as-of date to record (default: today, UTC)")
    u.set_defaults(func=cmd_prices_update)
    s = prices.add_parser("show", help="a model's rates and where each came from")
    s.add_argument("model")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=cmd_prices_show)
