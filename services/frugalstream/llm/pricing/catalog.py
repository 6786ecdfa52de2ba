"""Price catalog: USD per 1M tokens, priced in exact Decimal arithmetic.

Finance reconciles `baseline - actual` against the savings of every strategy, so pricing must not drift:
rates are read from JSON as Decimal (never through float), token counts are integers, and pricing runs in a
context that *raises* on any inexact operation instead of rounding silently. The only rounding anywhere is
at load: a self-hosted rate (a repeating fraction such as $3/h at 800 tok/s) is quantized to 1e-10 USD/1M.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow, localcontext
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from frugalstream.llm.pricing.litellm import LiteLLMMap, bare_aliases
from frugalstream.schemas import CostPoint

DEFAULT_PATH = Path(__file__).with_name("data") / "prices.json"
PER_MILLION = Decimal(1_000_000)
SELFHOSTED_QUANTUM = Decimal("1e-10")
_EXACT = Context(prec=80, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
# A dated snapshot (`gpt-4o-2024-08-06`, `claude-sonnet-4-20250514`, `gpt-3.5-turbo-0613`, `mistral-large-2411`)
# and a moving name (`claude-3-5-haiku-latest`), each with the family name in front.
_DATED = re.compile(r"^(?P<stem>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4})$")
_LATEST = re.compile(r"^(?P<stem>.+?)-latest$")
UNIT = "USD per 1M tokens"
_SELFHOSTED_KEYS = frozenset({"gpu_hour_usd", "tokens_per_s"})
_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")


class UnknownModelError(KeyError):
    """Raised instead of pricing at zero: an unpriced model would silently understate spend."""

    def __init__(self, model: str, close: list[str]) -> None:
        super().__init__(model)
        self.model, self.close = model, close

    def __str__(self) -> str:
        hint = f"; close names: {', '.join(self.close)}" if self.close else ""
        return f"no price for model {self.model!r} in the catalog{hint}"


_Rate = Annotated[Decimal | None, Field(ge=0)]


class _RateFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: _Rate = None
    cached_input: _Rate = None
    cache_write: _Rate = None
    output: _Rate = None
    reasoning: _Rate = None
    batch_input: _Rate = None
    batch_output: _Rate = None
    batch_cached_input: _Rate = None
    batch_cache_write: _Rate = None
    batch_reasoning: _Rate = None


class _LongContext(_RateFields):
    threshold: int = Field(gt=0)


class _Entry(_RateFields):
    """One model as written in a catalog file; unknown keys fail so a typo cannot price at a default."""

    provider: str
    context_window: int | None = Field(default=None, gt=0)
    gpu_hour_usd: Decimal | None = Field(default=None, ge=0)
    tokens_per_s: Decimal | None = Field(default=None, gt=0, description="Measured throughput of the tier.")
    long_context: _LongContext | None = None


class Source(BaseModel):
    """Where rates came from and the day they were taken from it."""

    model_config = ConfigDict(frozen=True)

    label: str
    as_of: str | None = None


def check_unit(unit: Any) -> str:
    """A file's `unit` must be the one every rate is read in: a file written per 1K tokens (OpenAI's old price
    page, most spreadsheets) and saying so would otherwise bill 1000x too little, and budgets trip 1000x late."""
    if unit != UNIT:
        raise ValueError(f"unit {unit!r} is not supported: rates are read as {UNIT!r} (a rate per 1K tokens is "
                         f"1000 times smaller than the same price per 1M: convert the file, or drop `unit`)")
    return UNIT


class _Doc(BaseModel):
    """A catalog file; top-level keys beyond these (notes) are documentation. `unit`, when given, must be
    `UNIT`. `sources` and `provenance` (model -> source key, or field -> source key with `*` as the default)
    say where each rate came from; a file without them is one source of its own."""

    version: str = Field(min_length=1)
    as_of: str | None = None
    currency: str = Field(default="USD", pattern="^USD$")
    unit: Annotated[str, BeforeValidator(check_unit)] = UNIT
    aliases: dict[str, str] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]]
    sources: dict[str, Source] = Field(default_factory=dict)
    provenance: dict[str, str | dict[str, str]] = Field(default_factory=dict)


def age_days(as_of: str | None, now: float | None = None) -> int | None:
    """Whole days since a catalog's (or a version string's leading) YYYY-MM-DD date; None when undated."""
    m = _DATE.match(as_of or "")
    if m is None:
        return None
    try:
        day = date.fromisoformat(m.group(1))
    except ValueError:
        return None
    today = datetime.fromtimestamp(now, UTC).date() if now is not None else datetime.now(UTC).date()
    return (today - day).days


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per 1M tokens of each billed kind."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal


@dataclass(frozen=True, slots=True)
class ModelPrice:
    provider: str
    standard: Rates
    batch: Rates | None
    context_window: int | None
    long_context: tuple[int, Rates, Rates | None] | None = None  # (prompt-token threshold, standard, batch)


def _or(value: Decimal | None, default: Decimal) -> Decimal:
    return value if value is not None else default


def _rates(f: _RateFields, name: str) -> tuple[Rates, Rates | None]:
    if f.input is None or f.output is None:
        raise ValueError(f"{name}: input and output rates are required")
    std = Rates(input=f.input, cached_input=_or(f.cached_input, f.input), cache_write=_or(f.cache_write, f.input),
                output=f.output, reasoning=_or(f.reasoning, f.output))
    if f.batch_input is None and f.batch_output is None:
        return std, None
    if f.batch_input is None or f.batch_output is None:
        raise ValueError(f"{name}: batch_input and batch_output go together")
    # Rates that only default to input/output follow the batch discount; explicitly listed ones keep their rate.
    return std, Rates(
        input=f.batch_input,
        cached_input=_or(f.batch_cached_input, f.batch_input if f.cached_input is None else std.cached_input),
        cache_write=_or(f.batch_cache_write, f.batch_input if f.cache_write is None else std.cache_write),
        output=f.batch_output,
        reasoning=_or(f.batch_reasoning, f.batch_output if f.reasoning is None else std.reasoning),
    )


def _model_price(name: str, raw: Mapping[str, Any]) -> ModelPrice:
    try:
        e = _Entry.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"price entry {name!r} is invalid: {exc}") from exc
    if e.gpu_hour_usd is not None:
        if e.tokens_per_s is None or e.input is not None or e.output is not None:
            raise ValueError(f"{name}: give gpu_hour_usd with tokens_per_s, or input/output rates, not both")
        with localcontext(Context(prec=60)):
            rate = (e.gpu_hour_usd / (e.tokens_per_s * 3600) * PER_MILLION).quantize(SELFHOSTED_QUANTUM)
        e = e.model_copy(update={"input": rate, "output": rate})
    long = e.long_context
    long_rates = (long.threshold, *_rates(long, f"{name}.long_context")) if long is not None else None
    return ModelPrice(e.provider, *_rates(e, name), e.context_window, long_rates)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Field-level merge, except that switching between API rates and GPU-derived rates drops the other."""
    kept = dict(base)
    if over.keys() & _SELFHOSTED_KEYS:
        kept = {k: v for k, v in kept.items() if k not in _RateFields.model_fields}
    if over.keys() & {"input", "output"}:
        kept = {k: v for k, v in kept.items() if k not in _SELFHOSTED_KEYS}
    return {**kept, **over}


def _read(path: Path) -> tuple[_Doc, bytes]:
    data = path.read_bytes()
    try:
        return _Doc.model_validate(json.loads(data, parse_float=Decimal)), data
    except ValidationError as exc:
        raise ValueError(f"price catalog {path} is invalid: {exc}") from exc


def _file_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).date().isoformat()


def _provenance(doc: _Doc, default: str) -> dict[str, dict[str, str]]:
    """model -> {field or `*`: source key}, for every model of the file."""
    out: dict[str, dict[str, str]] = {}
    for name in doc.models:
        given = doc.provenance.get(name, default)
        out[name.lower()] = {"*": given} if isinstance(given, str) else {"*": default, **given}
    return out


@dataclass(frozen=True)
class PriceCatalog:
    """Immutable catalog; build it with `load` or `from_litellm`, share it freely between threads."""

    _prices: Mapping[str, ModelPrice]
    _aliases: Mapping[str, str]
    _version: str
    _as_of: str | None = None
    _entries: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    _sources: Mapping[str, Source] = field(default_factory=dict)
    _provenance: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def _build(cls, raw_models: Mapping[str, Mapping[str, Any]], aliases: Mapping[str, str], version: str,
               as_of: str | None = None, sources: Mapping[str, Source] | None = None,
               provenance: Mapping[str, Mapping[str, str]] | None = None) -> PriceCatalog:
        prices = {name.lower(): _model_price(name, raw) for name, raw in raw_models.items()}
        alias_map = {a.lower(): t.lower() for a, t in aliases.items()}
        if dangling := {a: t for a, t in alias_map.items() if t not in prices}:
            raise ValueError(f"aliases point to unknown models: {dangling}")
        entries = {name.lower(): MappingProxyType(dict(raw)) for name, raw in raw_models.items()}
        return cls(MappingProxyType(prices), MappingProxyType(alias_map), version, as_of,
                   MappingProxyType(entries), MappingProxyType(dict(sources or {})),
                   MappingProxyType(dict(provenance or {})))

    @classmethod
    def load(cls, path: Path | None = None, overrides: Path | None = None) -> PriceCatalog:
        """The shipped (or given) catalog, with a team's own rates merged per model on top."""
        path = path or DEFAULT_PATH
        doc, _ = _read(path)
        models, aliases, version = {k.lower(): dict(v) for k, v in doc.models.items()}, dict(doc.aliases), doc.version
        sources = dict(doc.sources) or {
            "catalog": Source(label=f"{'shipped catalog' if path == DEFAULT_PATH else path} {doc.version}",
                              as_of=doc.as_of)}
        provenance = _provenance(doc, next(iter(sources)))
        if overrides is not None:
            over, data = _read(overrides)
            sources["overrides"] = Source(label=f"price overrides {overrides} ({over.version})",
                                          as_of=over.as_of or _file_date(overrides))
            for name, entry in over.models.items():
                key = name.lower()
                models[key] = _merge(models.get(key, {}), entry)
                kept = {f: s for f, s in provenance.get(key, {}).items() if f == "*" or f in models[key]}
                provenance[key] = {**kept, **dict.fromkeys(entry, "overrides")}
            aliases.update(over.aliases)
            version = f"{version}+{over.version}.{hashlib.sha256(data).hexdigest()[:8]}"
        return cls._build(models, aliases, version, doc.as_of, sources, provenance)

    @classmethod
    def from_litellm(cls, json_path: Path) -> PriceCatalog:
        """Imports LiteLLM's `model_prices_and_context_window.json` (USD per token -> per 1M)."""
        src = LiteLLMMap.read(json_path)
        models = src.models()
        return cls._build(models, bare_aliases(models), f"litellm-{src.sha256[:12]}",
                          sources={"litellm": Source(label=src.label)},
                          provenance={name: {"*": "litellm"} for name in models})

    @property
    def version(self) -> str:
        return self._version

    @property
    def as_of(self) -> str | None:
        """The day the catalog's rates were taken from their sources (YYYY-MM-DD), when it says."""
        return self._as_of

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self._prices))

    def entry(self, model: str) -> Mapping[str, Any]:
        """The model's rates as written (before defaults), keyed like a catalog file's entry."""
        return self._entries[self.resolve(model)]

    def source_of(self, model: str, rate: str) -> Source:
        """Which source gave this model this rate (a field of its entry), and on what day."""
        prov = self._provenance.get(self.resolve(model), {})
        key = prov.get(rate, prov.get("*", ""))
        return self._sources.get(key, Source(label=key or "unknown"))

    @cached_property
    def _dated_families(self) -> frozenset[str]:
        """Families whose dated snapshots the catalog lists by name (as a model or an alias): `gpt-4o`
        (`gpt-4o-2024-05-13`), `mistral-large` (`mistral-large-2411`)."""
        return frozenset(m.group("stem") for name in (*self._prices, *self._aliases)
                         if (m := _DATED.match(name.rsplit("/", 1)[-1])))

    def _resolve(self, model: str) -> str | None:
        """Breadth first: exact, then alias, then without provider prefix, then without `-latest` or a date.

        A date is dropped only when the family lists none of its own snapshots (`claude-sonnet-4-20250514` is
        `claude-sonnet-4`): where it lists some, their prices differ by date and an unlisted one is unknown,
        not the undated model's price. Nor does a dropped date ever lead to a `-latest` model (through an
        alias or directly): `-latest` follows the provider's newest model, priced unlike the older snapshot
        (`mistral-large-2407` is $2 / $6, `mistral-large-latest` Large 3 at $0.50 / $1.50)."""
        queue, seen = [(model.strip().lower(), False)], set[tuple[str, bool]]()
        while queue:
            name, undated = queue.pop(0)
            seen.add((name, undated))
            if undated and _LATEST.match(name.rsplit("/", 1)[-1]):
                continue
            if name in self._prices:
                return name
            bare = name.rsplit("/", 1)[-1]
            nexts = [(self._aliases.get(name), undated), (bare if bare != name else None, undated)]
            if m := _LATEST.match(name):
                nexts.append((m.group("stem"), undated))
            elif (m := _DATED.match(name)) and m.group("stem").rsplit("/", 1)[-1] not in self._dated_families:
                nexts.append((m.group("stem"), True))
            queue.extend((n, u) for n, u in nexts if n is not None and (n, u) not in seen)
        return None

    def resolve(self, model: str) -> str:
        """Canonical catalog name of `model` (dated snapshot, provider prefix or alias)."""
        name = self._resolve(model)
        if name is None:
            candidates = [*self._prices, *self._aliases]
            key = model.strip().lower().rsplit("/", 1)[-1]
            raise UnknownModelError(model, difflib.get_close_matches(key, candidates, n=5, cutoff=0.6))
        return name

    def has(self, model: str) -> bool:
        return self._resolve(model) is not None

    def rates(self, model: str) -> ModelPrice:
        return self._prices[self.resolve(model)]

    def provider(self, model: str) -> str:
        return self.rates(model).provider

    @cached_property
    def conservative_rates(self) -> Rates:
        """The most expensive rate of each kind anywhere in the catalog (standard, batch and long-context), for
        billing a model the catalog lacks: spend is never dropped, and the guess is at least what any listed
        model would bill for the same work, so a budget trips early rather than late."""
        every = [r for m in self._prices.values()
                 for r in (m.standard, m.batch, *(m.long_context[1:] if m.long_context else ())) if r is not None]

        def top(kind: str) -> Decimal:
            return max((Decimal(getattr(r, kind)) for r in every), default=Decimal(0))

        return Rates(input=top("input"), cached_input=top("cached_input"), cache_write=top("cache_write"),
                     output=top("output"), reasoning=top("reasoning"))

    def price_conservative(self, point: CostPoint) -> Decimal:
        """What `price` would charge at `conservative_rates`, whatever the model (no batch discount claimed)."""
        return self._at(self.conservative_rates, point)

    @staticmethod
    def _at(r: Rates, point: CostPoint) -> Decimal:
        u = point.usage
        with localcontext(_EXACT):
            total = (u.input_tokens * r.input + u.cached_input_tokens * r.cached_input
                     + u.cache_write_tokens * r.cache_write + u.output_tokens * r.output
                     + u.reasoning_tokens * r.reasoning)
            return total / PER_MILLION

    def price(self, point: CostPoint) -> Decimal:
        """Exact USD for the work; `usage` kinds are disjoint (input excludes cached, output excludes reasoning).

        Batch work uses the batch rates when the provider offers them, else the standard ones (no discount
        exists to claim). Long-context rates apply to the whole request above the model's threshold.
        """
        m = self.rates(point.model)
        u = point.usage
        prompt = u.input_tokens + u.cached_input_tokens + u.cache_write_tokens
        std, batch = m.standard, m.batch
        if m.long_context is not None and prompt > m.long_context[0]:
            _, std, batch = m.long_context
        return self._at(batch if point.batch and batch is not None else std, point)
