"""The bundled sample workload that `frugalstream demo` replays.

`data/demo_workload.jsonl.gz` (beside this module) holds about 700 `LLMRequest`s (gzip JSON lines) built by
`scripts/build_demo_workload.py` from redistributable datasets only; `data/DEMO_WORKLOAD.md` has the mix, how
it was built and the attribution of every source. Every request carries two demo-only tags:

- `workload`: its category (`faq`, `routine`, `hard`, `long_history`, `pinned`), for the demo's report;
- `arrival_ms`: when it arrives, in ms after the first request, taken from the inter-arrival gaps of the
  Azure LLM inference trace (conversation service), so the replay has production burstiness.

`created_at` is null in the file: the demo stamps it when it produces the request.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Final

from frugalstream.schemas import LLMRequest

DATA_PACKAGE: Final = "frugalstream.tools.data"
WORKLOAD_FILE: Final = "demo_workload.jsonl.gz"
WORKLOAD_TAG: Final = "workload"
ARRIVAL_TAG: Final = "arrival_ms"

WORKLOADS: Final[tuple[str, ...]] = ("faq", "routine", "hard", "long_history", "pinned")
# Documented share of each category (inclusive bounds); the builder and the tests both check against these.
MIX_RANGES: Final[dict[str, tuple[float, float]]] = {
    "faq": (0.40, 0.50),
    "routine": (0.20, 0.30),
    "hard": (0.12, 0.18),
    "long_history": (0.08, 0.12),
    "pinned": (0.03, 0.07),
}


def load_demo_workload() -> list[LLMRequest]:
    """The shipped workload, validated, in arrival order."""
    blob = resources.files(DATA_PACKAGE).joinpath(WORKLOAD_FILE).read_bytes()
    lines = gzip.decompress(blob).decode("utf-8").splitlines()
    return [LLMRequest.model_validate_json(line) for line in lines if line.strip()]


def workload_mix(requests: Iterable[LLMRequest]) -> dict[str, int]:
    """Request count per `workload` tag (`untagged` for requests without one)."""
    counts = Counter(r.tags.get(WORKLOAD_TAG, "untagged") for r in requests)
    return {name: counts[name] for name in sorted(counts)}


def arrival_offsets_s(requests: Sequence[LLMRequest], duration_s: float | None = None) -> list[float]:
    """Seconds after the replay start at which each request should be produced.

    Taken from the `arrival_ms` tag (requests without one arrive together with the previous one); with
    `duration_s` the trace is stretched or compressed so the last request arrives at `duration_s`.
    """
    offsets: list[float] = []
    last = 0.0
    for request in requests:
        raw = request.tags.get(ARRIVAL_TAG)
        last = max(last, float(raw) / 1000.0) if raw is not None else last
        offsets.append(last)
    if duration_s is not None and offsets and offsets[-1] > 0:
        scale = duration_s / offsets[-1]
        offsets = [t * scale for t in offsets]
    return offsets
