"""The uvicorn server around :func:`~.app.create_app`: connection limits, slow clients, graceful shutdown.

- **Slow headers (slowloris)**: a connection whose request headers are not complete ``header_timeout_s``
  after it opened (or after its previous answer) gets a 408 and is closed. Open connections do not count
  against the request limit, so even a crowd of them cannot keep ``/health``, the page or the API from
  answering. Past ``max_open`` open connections (4 x ``max_requests``, at least +256) a new connection
  takes the place of the oldest idle one (no request in progress: waiting for its headers, or kept alive
  between requests), as nginx does with its keep-alive connections; only when none is idle is the new one
  answered 503 at once. So ~320 idle connections cannot lock ``/health`` out.
- **Request limit**: at most ``max_requests`` generation requests (``POST /v1/chat/completions``) in flight
  (the ``--max-connections`` flag); more get 503 in OpenAI's error shape with ``Retry-After`` (uvicorn's own
  limit counts idle connections and answers in plain text, so it is off). A request takes its place only
  once its body is complete and parsed (the app calls ``scope["safeclip.admit"]``; ``intake.py`` bounds the
  upload itself by rate, deadline and memory), so 64 uploads at 1 byte/s hold nothing; ``/health``, the page,
  ``/static`` and ``/v1/models`` never count and never queue behind generation.
- **Memory**: ``intake.bound_heap`` (glibc's mmap threshold fixed, arenas capped; see ``intake.py``).
- **Graceful shutdown** (SIGTERM, SIGINT): uvicorn stops accepting; the app's ``begin_shutdown`` answers the
  queued requests 503 with ``Retry-After`` and lets the running one go on for ``shutdown_deadline_s``, then
  cuts it with an OpenAI error (a stream: an error event and ``[DONE]``). uvicorn's own cancellation, which
  would log tracebacks, comes only 5 s after that deadline.
- **One log**: start-up lines (``serve/cli.py``), uvicorn's own lines and the access lines go to stderr in one
  format, ``safeclip-serve: [warning: |error: ]MESSAGE`` (:func:`log_line`, :data:`LOG_CONFIG`); uvicorn's
  default would put access lines on stdout with a different prefix.
"""
from __future__ import annotations

import json
import logging
import math

import uvicorn
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.http.h11_impl import H11Protocol

from .intake import bound_heap
from . import PROG
from .request import error_body

RETRY_AFTER_S = 1


def log_line(message: str, level: int = logging.INFO) -> str:
    """The server's one log format; warnings and errors name their level, as the command's own messages do."""
    tag = "" if level < logging.WARNING else logging.getLevelName(level).lower() + ": "
    return f"{PROG}: {tag}{message}"


class LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = log_line(record.getMessage(), record.levelno)
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class AccessLineFormatter(AccessFormatter):
    """uvicorn's access fields (client, request line, status) in :func:`log_line`'s format."""

    def __init__(self):
        super().__init__(fmt='%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)

    def format(self, record: logging.LogRecord) -> str:
        return log_line(super().format(record), record.levelno)


LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"line": {"()": LineFormatter}, "access": {"()": AccessLineFormatter}},
    "handlers": {name: {"formatter": name, "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
                 for name in ("line", "access")},
    "loggers": {"uvicorn": {"handlers": ["line"], "level": "INFO", "propagate": False},
                "uvicorn.error": {"level": "INFO"},
                "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False}},
}


def _raw_error(status: int, reason: bytes, message: str, code: str, retry_after: int | None = None) -> bytes:
    body = json.dumps(error_body(status, message, code)).encode()
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % (
        status, reason, len(body))
    if retry_after is not None:
        head += b"retry-after: %d\r\n" % retry_after
    return head + b"\r\n" + body


def guarded_protocol(header_timeout_s: float, max_open: int) -> type:
    """uvicorn's h11 protocol with a header deadline and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None
        _armed_cycle = None
        _idle_since = 0.0                           # loop time when it last began waiting for headers

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_open and not self._evict_idle():
                transport.write(_raw_error(503, b"Service Unavailable", f"more than {max_open} open connections; "
                                           "try again shortly", "too_many_connections", RETRY_AFTER_S))
                transport.close()
                return
            self._arm()

        def _evict_idle(self) -> bool:
            """Close the longest-idle other connection (no request in progress) to make room; False if none."""
            idle = [c for c in self.connections if c is not self and getattr(c, "_header_timer", None) is not None
                    and not c.transport.is_closing()]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c._idle_since)
            victim._disarm()
            victim.transport.write(_raw_error(408, b"Request Timeout", "idle connection closed to make room for "
                                              "another", "request_timeout"))
            victim.transport.close()
            return True

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._idle_since = self.loop.time()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                self.transport.write(_raw_error(408, b"Request Timeout", f"the request headers did not arrive "
                                                f"within {header_timeout_s:g} s", "request_timeout"))
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.cycle is not self._armed_cycle:
                self._disarm()                      # a request's headers are complete

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()          # may start a pipelined request at once
            if not self.transport.is_closing() and self.cycle is done:
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


GENERATION = ("POST", "/v1/chat/completions")        # the only route that holds the model


class RequestLimit:
    """ASGI middleware: at most ``max_requests`` generation requests in flight, each counted from the moment its
    body is complete (the app calls ``scope["safeclip.admit"]()``: None when admitted, else the 503 message)."""

    def __init__(self, app, max_requests: int):
        self.app, self.max_requests, self.active = app, max_requests, 0
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"], scope["path"]) != GENERATION:
            return await self.app(scope, receive, send)
        held = False

        def admit() -> str | None:
            nonlocal held
            if held:
                return None
            if self.active >= self.max_requests:
                return (f"{self.active} requests are in flight, the most this server takes; try again shortly")
            self.active += 1
            held = True
            return None

        try:
            await self.app({**scope, "safeclip.admit": admit}, receive, send)
        finally:
            if held:
                self.active -= 1


class SafeclipServer(uvicorn.Server):
    """uvicorn's server, telling the app to stop taking work before it waits for the connections."""

    def __init__(self, config: uvicorn.Config, app, shutdown_deadline_s: float):
        super().__init__(config)
        self.safeclip, self.shutdown_deadline_s = app.state.safeclip, shutdown_deadline_s

    async def shutdown(self, sockets=None) -> None:
        self.safeclip.begin_shutdown(self.shutdown_deadline_s)
        await super().shutdown(sockets)


def make_server(app, *, max_requests: int = 64, header_timeout_s: float = 10.0, shutdown_deadline_s: float = 10.0,
                log_level: str = "info", **config) -> SafeclipServer:
    """A :class:`SafeclipServer` for ``app`` (from ``create_app``); ``config``: more ``uvicorn.Config`` fields."""
    for name, v in (("max_requests", max_requests), ("header_timeout_s", header_timeout_s),
                    ("shutdown_deadline_s", shutdown_deadline_s)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    protocol = guarded_protocol(header_timeout_s, max(4 * max_requests, max_requests + 256))
    config.setdefault("log_config", LOG_CONFIG)
    bound_heap()
    cfg = uvicorn.Config(RequestLimit(app, max_requests), http=protocol, log_level=log_level,
                         timeout_keep_alive=5, timeout_graceful_shutdown=math.ceil(shutdown_deadline_s) + 5,
                         server_header=False, **config)
    return SafeclipServer(cfg, app, shutdown_deadline_s)
