"""CORS and ``OPTIONS``/``HEAD`` for the app (pure ASGI middleware, no framework).

``OPTIONS`` answers 204 with ``Allow`` for a known route (404 otherwise); from an ``Origin`` in the allowed
list (``--cors-origin``, empty by default) it is also a CORS preflight (``Access-Control-Allow-Methods``,
``-Headers``, ``-Max-Age``), and every answer to such an origin carries ``Access-Control-Allow-Origin`` and
``Vary: Origin``. Other origins get no CORS headers, so the browser keeps their pages from reading answers.
``HEAD`` on a ``GET`` route is answered as ``GET`` without the body (FastAPI routes answer ``GET`` only).
"""
from __future__ import annotations

import json

from .request import error_body

ROUTE_METHODS = {"/v1/chat/completions": "POST, OPTIONS"}       # every other known route: GET, HEAD, OPTIONS


def _allowed_methods(path: str) -> str | None:
    if path in ROUTE_METHODS:
        return ROUTE_METHODS[path]
    if path in ("/", "/health", "/v1/models") or path.startswith(("/v1/models/", "/static/")):
        return "GET, HEAD, OPTIONS"
    return None


class CORSAndOptions:
    """ASGI middleware: ``OPTIONS`` (plain: 204 + ``Allow``; CORS preflight from an allowed origin: 204 + the
    ``Access-Control-*`` headers) and ``Access-Control-Allow-Origin`` on the answers to allowed origins."""

    def __init__(self, app, origins: tuple[str, ...]):
        self.app, self.origins = app, origins

    def _allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin in self.origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        cors = self._allowed(origin)
        extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                 (b"access-control-expose-headers", b"Retry-After")] if cors else []
        if scope["method"] == "OPTIONS":
            allow = _allowed_methods(scope["path"])
            if allow is None:
                body = json.dumps(error_body(404, "Not Found", "not_found")).encode()
                h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 404, "headers": h + extra})
                await send({"type": "http.response.body", "body": body})
                return
            h = [(b"allow", allow.encode())]
            if cors and "access-control-request-method" in headers:
                h += [(b"access-control-allow-methods", allow.encode()),
                      (b"access-control-allow-headers", b"authorization, content-type"),
                      (b"access-control-max-age", b"600")]
            await send({"type": "http.response.start", "status": 204, "headers": h + extra})
            await send({"type": "http.response.body", "body": b""})
            return
        head = scope["method"] == "HEAD" and "GET" in (_allowed_methods(scope["path"]) or "")
        if head:                                    # FastAPI routes answer GET only: HEAD is GET without the body
            scope = {**scope, "method": "GET"}
        if not cors and not head:
            return await self.app(scope, receive, send)

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_wrapped)
