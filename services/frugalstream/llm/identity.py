"""Identity is (tenant, request id): two tenants may use the same id and must never meet through it."""

from __future__ import annotations

import json


def request_key(tenant: str, request_id: str) -> str:
    """One string per (tenant, request id), unambiguous whatever characters either holds (JSON array text)."""
    return json.dumps([tenant, request_id], separators=(",", ":"), ensure_ascii=False)


def usage_id(stage: str, tenant: str, request_id: str) -> str:
    """Deterministic usage id: a redelivery gets the same one, another tenant's request never does."""
    return f"{stage}:{request_key(tenant, request_id)}"
