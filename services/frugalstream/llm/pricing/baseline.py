"""The savings baseline: the model a request's counterfactual is priced on.

One rule for the classifier, which writes it on the route (and so into every usage record the ledger prices),
and for the HTTP entry's cost headers, which promise to price an answer like the ledger does.
"""

from __future__ import annotations

from frugalstream.llm.pricing.catalog import PriceCatalog


def savings_baseline(catalog: PriceCatalog, default: str, *, configured: str | None, pinned: str | None,
                     pin_served: bool) -> str:
    """The baseline of a request of a tenant whose policy names `configured` (None: unset), pinned to `pinned`
    (None: unpinned); `pin_served` says the pin is what ran (a budget did not drop it).

    - A pin served as asked, without a configured baseline, is its own baseline, priced or not: it saves nothing
      and costs nothing more.
    - Else the configured baseline when the catalog prices it: an operator's typo falls back instead of refusing
      the tenant's traffic or pricing every saving against the catalog's top rates.
    - Else the pinned model when the catalog prices it. A pin the catalog lacks (dropped by a budget) is not: as
      the baseline it would be priced at the catalog's highest rates, crediting `routed_down` with a saving
      measured against a guess.
    - Else `default`.
    """
    if pin_served and configured is None and pinned is not None:
        return pinned
    if configured is not None and catalog.has(configured):
        return configured
    if pinned is not None and catalog.has(pinned):
        return pinned
    return default
