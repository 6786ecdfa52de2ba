"""API keys -> tenants. Only key digests are kept in memory, and a lookup costs the same for every key."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

from frugalstream.runtime.settings import Settings, UsageError

#: `frugalstream dev`'s key when none is configured, and the tenant it belongs to.
DEV_KEY, DEV_TENANT = "frugal-dev", "dev"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Which tenant a bearer key belongs to; None for an unknown, empty or missing key."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        for key, tenant in keys.items():
            if not key or not isinstance(tenant, str) or not tenant or len(tenant) > 128:
                raise UsageError("http_api_keys: every key must be a non-empty string naming a tenant "
                                 "(1-128 characters)")
        self._tenants = {_digest(k): t for k, t in keys.items()}

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
                raise UsageError(f"{where}: API keys must be a JSON object {{\"<key>\": \"<tenant>\"}}")
            keys.update(loaded)
        if not keys and dev:
            keys = {DEV_KEY: DEV_TENANT}
        return cls(keys)
