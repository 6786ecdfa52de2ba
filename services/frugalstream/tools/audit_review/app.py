"""The review app (Starlette): the page, the current audit as JSON, and verdicts written as they are given.

The session holds the queue read at start; each accept or reject is published to `llm.audits.reviews` and
acknowledged by the broker before the next audit is shown, so a closed tab loses nothing already answered.
A verdict is accepted only for an audit of this session's queue (so only of its tenant) and only for the
answers the page showed (their hash).

One rule, whatever `--host` binds: nothing that names the tenant or carries its data is served without the
per-run token. The page wants it in its URL (`?token=`, printed by the command; never put in the HTML), the
API in the `X-Review-Token` header the script sends from that URL; only the constant script and style are
public. So a client on the network that never saw the printed URL reads nothing and writes nothing, and
another site open in the same browser cannot either (on loopback a local Host header is required too, against
DNS rebinding).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from frugalstream.schemas.audits import AuditRecord
from frugalstream.tools.audit_review.page import CSS, FORBIDDEN_PAGE, JS, page
from frugalstream.tools.audit_review.queue import ReviewStore, digest_of, verdict_for

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
VERDICTS = ("accept", "reject", "skip")


@dataclass
class ReviewSession:
    tenant: str
    items: list[AuditRecord]
    store: ReviewStore
    reviewer: str = ""
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    decided: dict[str, str] = field(default_factory=dict)  # audit id -> accept / reject / skip
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def current(self) -> AuditRecord | None:
        return next((r for r in self.items if r.audit_id not in self.decided), None)

    def state(self) -> dict[str, Any]:
        item = self.current()
        skipped = sum(1 for v in self.decided.values() if v == "skip")
        return {"item": None if item is None else item_json(item),
                "progress": {"reviewed": len(self.decided) - skipped, "skipped": skipped, "total": len(self.items)}}

    async def decide(self, audit_id: str, verdict: str, answers_sha256: str) -> str | None:
        """None when done, else why not (the page shows it). One decision at a time: a double key press
        cannot publish twice."""
        async with self.lock:
            record = next((r for r in self.items if r.audit_id == audit_id), None)
            if record is None:
                return "unknown audit for this review"
            if audit_id in self.decided:
                return "already decided in this review"
            if digest_of(record) != answers_sha256:
                return "the answers shown are not the audit's"
            if verdict in ("accept", "reject"):
                await self.store.publish([verdict_for(record, "accept" if verdict == "accept" else "reject",
                                                      self.reviewer)])
            self.decided[audit_id] = verdict
            return None


def shown(text: str) -> str:
    """`text` as a reviewer must see it: each control or format character (ESC, a bidi override or isolate, a
    zero-width space, a soft hyphen), which a browser obeys or hides, written as its escape (`\\u202e`); line
    breaks and tabs kept. Else "$\\u202e001" reads "$100", and "Paris" and "Pa\\u200bris" look the same."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\r\t" else c
                   for c in text)


def item_json(r: AuditRecord) -> dict[str, Any]:
    """The audit as the page shows it. The id (posted back as is) and the hash are the record's own."""
    return {"audit_id": r.audit_id, "kind": r.kind, "task_type": shown(r.task_type), "tier": r.tier,
            "question": shown(r.question), "served": shown(r.candidate.content),
            "served_model": shown(r.candidate.model or ""), "baseline": shown(r.reference.content),
            "baseline_model": shown(r.reference.model or ""), "answers_sha256": digest_of(r)}


def same_token(given: str, token: str) -> bool:
    """Constant time, and as bytes: `compare_digest` raises on a non-ASCII str, which would be a 500."""
    return secrets.compare_digest(given.encode(), token.encode())


def _json(body: object, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=SECURITY_HEADERS)


def build_app(session: ReviewSession, hosts: Sequence[str] = LOCAL_HOSTS) -> Starlette:
    def authorized(request: Request) -> bool:
        return same_token(request.headers.get("x-review-token", ""), session.token)

    async def index(request: Request) -> Response:
        if not same_token(request.query_params.get("token", ""), session.token):
            return HTMLResponse(FORBIDDEN_PAGE, status_code=403, headers=SECURITY_HEADERS)
        return HTMLResponse(page(session.tenant), headers=SECURITY_HEADERS)

    async def script(_: Request) -> Response:
        return Response(JS, media_type="text/javascript", headers=SECURITY_HEADERS)

    async def style(_: Request) -> Response:
        return Response(CSS, media_type="text/css", headers=SECURITY_HEADERS)

    async def state(request: Request) -> Response:
        if not authorized(request):
            return _json({"error": "missing or wrong review token"}, 403)
        return _json(session.state())

    async def verdict(request: Request) -> Response:
        if not authorized(request):
            return _json({"error": "missing or wrong review token"}, 403)
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in
                                                 ("audit_id", "verdict", "answers_sha256")):
            return _json({"error": "want audit_id, verdict and answers_sha256"}, 400)
        if body["verdict"] not in VERDICTS:
            return _json({"error": f"verdict must be one of {', '.join(VERDICTS)}"}, 400)
        try:
            refused = await session.decide(body["audit_id"], body["verdict"], body["answers_sha256"])
        except Exception as exc:  # the broker did not take it: the page keeps the audit and says so
            return _json({"error": f"could not publish the verdict ({type(exc).__name__})"}, 503)
        if refused is not None:
            return _json({"error": refused}, 409)
        return _json(session.state())

    routes = [Route("/", index), Route("/app.js", script), Route("/app.css", style),
              Route("/api/state", state), Route("/api/verdict", verdict, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))])
