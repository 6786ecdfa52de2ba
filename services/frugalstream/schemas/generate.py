"""Writes the JSON Schema of every contract to the repository's `schemas/json/` (`make schemas`).

The pydantic models in this package are the single source of truth; the checked-in JSON Schema files are the
published form of the contracts, for producers in other languages, and a test fails when they drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from frugalstream.schemas.topics import CONTRACTS_BY_NAME

# services/frugalstream/schemas/generate.py -> the checkout root, where `schemas/json/` lives.
JSON_DIR = Path(__file__).resolve().parents[3] / "schemas" / "json"


def render() -> dict[str, str]:
    """File name -> text, deterministic so a diff means the models changed."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(mode="serialization"), indent=2, sort_keys=True)
        + "\n"
        for name, model in sorted(CONTRACTS_BY_NAME.items())
    }


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (JSON_DIR / name).write_text(text)
    print(f"wrote {len(CONTRACTS_BY_NAME)} schemas to {JSON_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
