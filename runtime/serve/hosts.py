"""``Host`` and ``Origin`` checks against DNS rebinding (pure ASGI middleware).

A web page from ``http://evil.example`` can re-point its own name at 127.0.0.1 (DNS rebinding); the browser
then treats the loopback server as that page's own origin and lets it drive the API, read the answers, and
use the model. The request still says who it was for: ``Host: evil.example``. So:

- **Host**, on a connection that arrived at a loopback address (the server bound to 127.0.0.1/::1, or reached
  through it): accepted only when it names this machine, ``localhost``, ``*.localhost`` (RFC 6761), an
  address in 127.0.0.0/8 or ``[::1]``, with any port, or a name given with ``--allowed-host`` (repeatable,
  e.g. a kiosk's ``kiosk.local``). Anything else, or no ``Host``, is a 403 ``host_not_allowed``. A server
  bound to another address checks ``Host`` only when ``--allowed-host`` is given (then its own address is
  accepted too); otherwise it is reached under names it cannot know, and ``--api-key`` is its protection.
- **Origin**, on every connection: a browser names the page that sent the request. Accepted when absent
  (not a browser), when it is the server's own origin (same host and port as ``Host``: the kiosk page), a
  loopback or ``--allowed-host`` origin, or an origin in ``--cors-origin``; anything else (another site,
  ``null`` from a sandboxed frame or a file) is a 403 ``origin_not_allowed``, even for a request that a
  browser sends without a preflight. ``OPTIONS`` is exempt: it does nothing, and ``cors.py`` gives such an
  origin no CORS headers, so the browser blocks what would follow.
"""
from __future__ import annotations

import ipaddress
import json
import urllib.parse

from .request import error_body


def _host_part(value: str) -> str:
    """``host`` of ``host[:port]`` / ``[v6]:port``, lower-case, without a trailing dot."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0].rstrip(".") if v.count(":") == 1 else v.rstrip(".")


def is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: the ``Host``/``Origin`` rules of the module docstring."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {_host_part(h) for h in allowed_hosts if h.strip()}
        self.cors = set(cors_origins)

    def _host_ok(self, host: str) -> bool:
        return is_loopback_name(host) or host in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host_header = headers.get("host", "")
        local = _host_part(str((scope.get("server") or ("",))[0] or ""))
        enforce = is_loopback_name(local) or bool(self.allowed)
        host = _host_part(host_header)
        if enforce and not (host_header and (self._host_ok(host) or host == local)):
            return await _refuse(send, f"Host '{host_header[:80]}' is not this server's name (a loopback name or "
                                 "--allowed-host); refused against DNS rebinding", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and scope["method"] != "OPTIONS" and not self._origin_ok(origin, host_header):
            return await _refuse(send, f"Origin '{origin[:80]}' may not call this server (same origin, loopback, "
                                 "--allowed-host or --cors-origin only)", "origin_not_allowed")
        return await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host_header: str) -> bool:
        if "*" in self.cors or origin in self.cors:
            return True
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False                            # "null" and anything else that names no site
        if host_header and parts.netloc.lower() == host_header.strip().lower():
            return True                             # the page this server served
        return self._host_ok(_host_part(parts.netloc))


async def _refuse(send, message: str, code: str) -> None:
    body = json.dumps(error_body(403, message, code)).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
