"""Reading request bodies so that slow or many clients cannot starve the server or swell its memory.

- **A minimum rate and a total deadline**: after a grace of ``grace_s`` the body must have arrived at
  ``min_rate`` bytes/s on average since its first byte was awaited (a client at 1 byte/s is cut after the
  grace), and all of it within ``timeout_s``; either is a 408. (Kestrel's MinRequestBodyDataRate, 240 bytes/s
  after 5 s, is the model; 1 KiB/s here, as an image upload that slow would not finish within the deadline.)
- **A memory budget for requests**: at most ``budget_bytes`` of request bodies are in the server at once,
  reserved before reading (the declared ``Content-Length``, or ``max_body_bytes`` for a chunked body) and
  given back when the request has been answered (``ReleaseAfter``): a body's JSON, its decoded image bytes
  and pixels live until then, about 3-4 times its size. A body that does not fit waits, unread: its bytes stay
  in the kernel's socket buffers and TCP holds the client back; after ``wait_s`` (the queue timeout) it is a
  503 with ``Retry-After``. Text-only requests are a few KB and are not held back in practice. At most two
  bodies are parsed at once (``parse_slots``).
- **Giving memory back**: glibc raises its mmap threshold each time a large block is freed, after which
  multi-MB buffers come from the heap and stay resident once freed (64 concurrent 14.5 MB bodies left 1.0 GiB
  resident here, 2.1-2.4 GiB in the report that found it). ``bound_heap`` (called by ``server.make_server``)
  fixes the threshold at 1 MiB and caps malloc arenas at 4; and when the last large request has been
  answered the heap's free pages are handed back (``malloc_trim``). Both are no-ops off glibc.
- The generation slot (``server.RequestLimit``) is taken only once the body is complete and parsed.

Every problem raises :class:`~.request.RequestError` (408, 413, 400, 503).
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import sys
import time

from starlette.requests import ClientDisconnect

from .request import RequestError

MIN_RATE = 1024            # bytes/s, averaged since the body was first awaited
GRACE_S = 5.0
TRIM_AFTER_S = 1.0


class BodyBudget:
    """Bytes of request bodies held at once; single event loop."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self, n: int, timeout_s: float) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.total), timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(503, f"{self.used >> 20} MiB of request bodies are being received, the most this "
                                   "server holds at once; try again shortly", "server_busy") from None
            self.used += n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class Intake:
    """Reads a request's body under the rules of the module docstring."""

    def __init__(self, max_body_bytes: int, timeout_s: float, budget_bytes: int, min_rate: float = MIN_RATE,
                 grace_s: float = GRACE_S, parse_slots: int = 2, wait_s: float = 120.0):
        self.max_body_bytes, self.timeout_s, self.min_rate, self.grace_s = max_body_bytes, timeout_s, min_rate, grace_s
        self.budget = BodyBudget(max(budget_bytes, max_body_bytes))
        self.wait_s = wait_s
        self.parse_slots = parse_slots
        self._parse_sem: asyncio.Semaphore | None = None
        self._trim: asyncio.TimerHandle | None = None

    def reservation(self, request) -> int:
        """Bytes to reserve: the declared length, checked against the limit, else the limit."""
        declared = request.headers.get("content-length")
        if declared is None:
            return self.max_body_bytes
        if not declared.isdigit():
            raise RequestError(400, "invalid Content-Length", "request_too_large")
        if int(declared) > self.max_body_bytes:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} "
                               "bytes", "request_too_large")
        return max(int(declared), 1)

    async def parsed(self, request, parse):
        """``parse(body)`` run on a worker thread (at most ``parse_slots`` at once), the request held within the
        budget from its first byte until it has been answered (``ReleaseAfter`` gives it back)."""
        n = self.reservation(request)
        after = request.scope.get("safeclip.after")
        await self.budget.acquire(n, self.wait_s)
        try:
            body = await self._read(request)
            if self._parse_sem is None:
                self._parse_sem = asyncio.Semaphore(self.parse_slots)
            async with self._parse_sem:
                import anyio
                parsed = await anyio.to_thread.run_sync(parse, body)
        except BaseException:
            await self._release(n)
            raise
        if after is None:                               # no ReleaseAfter around the app: give it back now
            await self._release(n)
        else:
            after.append(lambda: self._release(n))
        return parsed

    async def _release(self, n: int) -> None:
        await self.budget.release(n)
        if n >= 1 << 20:
            gc.collect()                            # a large request's buffers can sit in reference cycles
            if self._trim is None:                  # once idle for a moment (the model thread lets go last)
                self._trim = asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._trim_when_idle)

    def _trim_when_idle(self) -> None:
        self._trim = None
        if self.budget.used == 0:
            trim_heap()

    async def _read(self, request) -> bytes:
        limit, t0 = self.max_body_bytes, time.monotonic()
        deadline = t0 + self.timeout_s
        parts, n = [], 0
        it = request.stream().__aiter__()
        while True:
            due = min(deadline, t0 + self.grace_s + n / self.min_rate)
            try:
                chunk = await asyncio.wait_for(it.__anext__(), max(0.0, due - time.monotonic()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                if due >= deadline:
                    raise RequestError(408, f"the request body did not arrive within {self.timeout_s:.0f} s",
                                       "request_timeout") from None
                raise RequestError(408, f"the request body arrived slower than {self.min_rate:.0f} bytes/s "
                                   f"(after {self.grace_s:g} s)", "request_timeout") from None
            except ClientDisconnect:
                raise RequestError(400, "the client disconnected before the body was complete",
                                   "client_disconnected") from None
            n += len(chunk)
            if n > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
            parts.append(chunk)
        return b"".join(parts)


class ReleaseAfter:
    """ASGI middleware: runs what a request registered in ``scope["safeclip.after"]`` once it has been answered
    (a stream: once it ended), whatever happened."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        after: list = []
        try:
            await self.app({**scope, "safeclip.after": after}, receive, send)
        finally:
            for fn in after:
                await fn()


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_heap() -> bool:
    """glibc: a fixed 1 MiB mmap threshold and at most 4 arenas (see the module docstring); False elsewhere."""
    libc = _glibc()
    if libc is None:
        return False
    m_mmap_threshold, m_arena_max = -3, -8                              # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 20)) and bool(libc.mallopt(m_arena_max, 4))


def trim_heap() -> None:
    """glibc: hand the heap's free pages back to the system (a few ms for a GB heap); nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        gc.collect()
        libc.malloc_trim(0)
