"""Bounded per-tenant memory for the audit service: a tenant is a free field of a request, so a producer
inventing tenants must never grow what the service remembers. The configured (reserved) tenants keep their own
memory; the others share one tenant's worth, and past it the tenant holding the most evicts its own first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

C = TypeVar("C", bound=tuple[str, ...])  # a cell: (tenant, ...)
V = TypeVar("V")


class Shares:
    """What the tenants not `reserved` (configured) hold of a memory they share, bounded by `limit`. Past the
    limit the owner evicts from `victim()`: the tenant holding the most, the least recently active among equals,
    so a flood evicts its own first and a quiet tenant keeps what it has while it holds no more than the others."""

    def __init__(self, limit: int, reserved: Iterable[str] = ()) -> None:
        self.limit = limit
        self.reserved = frozenset(reserved)
        self.held = 0  # what the tenants not reserved hold together
        self._counts: dict[str, int] = {}
        self._by_count: dict[int, OrderedDict[str, None]] = {}  # tenants by count, least recently active first
        self._largest = 0

    def over(self) -> bool:
        return self.held > self.limit

    def victim(self) -> str:
        return next(iter(self._by_count[self._largest]))

    def moved(self, tenant: str, delta: int) -> None:
        """`tenant` now holds `delta` more (-1, 0 or 1: 0 only marks it active)."""
        if tenant in self.reserved:
            return
        before = self._counts.get(tenant, 0)
        after = before + delta
        self.held += delta
        if before:
            bucket = self._by_count[before]
            del bucket[tenant]
            if not bucket:
                del self._by_count[before]
                if self._largest == before:
                    self._largest = after  # counts move by one: `after` holds this tenant, or none is left
        if after:
            self._counts[tenant] = after
            self._by_count.setdefault(after, OrderedDict())[tenant] = None
            self._largest = max(self._largest, after)
        else:
            self._counts.pop(tenant, None)


class CellBook(Generic[C, V]):
    """Entries by key in cells `(tenant, ...)`, oldest first, at most `window` a cell; putting a key again
    replaces its entry (counted once) and makes it the newest. The tenants not `reserve`d share
    `window * cells_per_tenant` entries: past that, the victim tenant's least recently written cell loses its
    oldest entry (and goes, once empty)."""

    def __init__(self, window: int, cells_per_tenant: int) -> None:
        self.window = window
        self.cells_per_tenant = cells_per_tenant
        self.cells: dict[C, OrderedDict[str, V]] = {}
        self._tenant_cells: dict[str, OrderedDict[C, None]] = {}  # per tenant: its cells, least recently written first
        self.reserve(())

    def reserve(self, tenants: Iterable[str]) -> None:
        """The configured tenants: their entries are never evicted by other tenants' (call before any `put`)."""
        self.shares = Shares(self.window * self.cells_per_tenant, tenants)

    def put(self, cell: C, key: str, value: V) -> None:
        entries = self.cells.setdefault(cell, OrderedDict())
        before = len(entries)
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.window:
            entries.popitem(last=False)
        cells = self._tenant_cells.setdefault(cell[0], OrderedDict())
        cells[cell] = None
        cells.move_to_end(cell)
        self.shares.moved(cell[0], len(entries) - before)
        while self.shares.over():
            self._evict(self.shares.victim())

    def get(self, cell: C) -> OrderedDict[str, V]:
        """The cell's entries, oldest first (empty for a cell never written); read, never write, through it."""
        return self.cells.get(cell, OrderedDict())

    def _evict(self, tenant: str) -> None:
        cells = self._tenant_cells[tenant]
        oldest = next(iter(cells))
        entries = self.cells[oldest]
        entries.popitem(last=False)
        self.shares.moved(tenant, -1)
        if not entries:
            del self.cells[oldest], cells[oldest]
            if not cells:
                del self._tenant_cells[tenant]
