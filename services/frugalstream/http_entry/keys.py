"""API keys -> tenants, and the tags a key fixes. Only key digests are kept in memory, and a lookup costs the
same for every key.

A key's value is its tenant (`"acme"`) or `{"tenant": "acme", "tags": {"team": "search"}}`: the tags are set on
every request made with the key, so a tag budget (`team=search`) binds whoever holds it; a caller cannot leave
the tag out or send another value for it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from frugalstream.runtime.settings import Settings, UsageError
from frugalstream.schemas.requests import checked_tags

#: `frugalstream dev`'s key when none is configured, and the tenant it belongs to.
DEV_KEY, DEV_TENANT = "frugal-dev", "dev"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Which tenant a bearer key belongs to; None for an unknown, empty or missing key."""

    def __init__(self, keys: Mapping[str, str | Mapping[str, Any]]) -> None:
        self._tenants: dict[bytes, str] = {}
        self._tags: dict[bytes, dict[str, str]] = {}
        for key, value in keys.items():
            tenant, tags = (value, {}) if isinstance(value, str) else _entry(value)
            if not key or not isinstance(tenant, str) or not tenant or len(tenant) > 128:
                raise UsageError("http_api_keys: every key must be a non-empty string naming a tenant "
                                 "(1-128 characters), or {\"tenant\": ..., \"tags\": {...}}")
            self._tenants[_digest(key)] = tenant
            if tags:
                self._tags[_digest(key)] = tags

    def __len__(self) -> int:
        return len(self._tenants)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(self._tenants.values())

    def tenant(self, authorization: str | None) -> str | None:
        found = self.caller(authorization)
        return None if found is None else found[0]

    def caller(self, authorization: str | None) -> tuple[str, bytes] | None:
        """(tenant, the key's digest): the digest tells two keys of one tenant apart (idempotency binds a
        key to the API key that used it) without keeping the key itself."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = _digest(authorization.removeprefix("Bearer ").strip())
        found = None
        for digest, tenant in self._tenants.items():  # every digest compared: no early exit to time
            if hmac.compare_digest(digest, presented):
                found = (tenant, digest)
        return found

    def fixed_tags(self, digest: bytes) -> Mapping[str, str]:
        """The tags the key with this digest sets on every request (empty for a plain key)."""
        return self._tags.get(digest, {})

    @classmethod
    def from_settings(cls, settings: Settings, *, dev: bool = False) -> ApiKeys:
        """`FRUGAL_HTTP_API_KEYS` and `FRUGAL_HTTP_API_KEYS_FILE` (JSON objects key -> tenant), merged; in dev
        mode with neither set, the one key `frugal-dev` of tenant `dev`."""
        keys: dict[str, str] = {}
        sources = [("FRUGAL_HTTP_API_KEYS", settings.http_api_keys.get_secret_value()
                    if settings.http_api_keys else None)]
        if settings.http_api_keys_file is not None:
            try:
                sources.append((str(settings.http_api_keys_file), settings.http_api_keys_file.read_text()))
            except OSError as exc:
                raise UsageError(f"http_api_keys_file {settings.http_api_keys_file}: {exc.strerror}") from None
        for where, text in sources:
            if text is None:
                continue
            try:
                loaded = json.loads(text)
            except ValueError:
                loaded = None
            if not isinstance(loaded, dict):
                raise UsageError(f"{where}: API keys must be a JSON object {{\"<key>\": \"<tenant>\"}} (or "
                                 "{\"<key>\": {\"tenant\": \"<tenant>\", \"tags\": {...}}})")
            keys.update(loaded)
        if not keys and dev:
            keys = {DEV_KEY: DEV_TENANT}
        return cls(keys)


def _entry(value: object) -> tuple[object, dict[str, str]]:
    """(tenant, tags) of a key's object value, its tags held to the rules of a request's own."""
    if not isinstance(value, Mapping) or set(value) - {"tenant", "tags"}:
        raise UsageError("http_api_keys: a key's value is a tenant, or an object with `tenant` and `tags` only")
    tags = value.get("tags") or {}
    if not isinstance(tags, Mapping) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                for k, v in tags.items()):
        raise UsageError("http_api_keys: a key's `tags` must be an object of strings")
    try:
        return value.get("tenant"), checked_tags(dict(tags))
    except ValueError as exc:
        raise UsageError(f"http_api_keys: {exc}") from None
