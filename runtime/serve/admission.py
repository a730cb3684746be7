"""Admission to the model (the slot): one request runs at a time, at most ``max_queue`` wait in arrival order.

A waiter is handed the slot directly by ``release`` (no race for it), gives up after ``queue_timeout_s``
(:class:`Busy`, answered 503 with ``Retry-After``), and leaves the line at once when its client disconnects
(:class:`Disconnected`), watched through the ASGI ``receive`` channel; ``fail_waiters`` turns the whole line
away at shutdown. Single event loop, no locks needed.
"""
from __future__ import annotations

import asyncio
import math
from collections import deque


class Busy(Exception):
    """The queue is full or the wait was too long: answer 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Disconnected(Exception):
    """The client went away while waiting for the model."""


class Slot:
    """One model, one request at a time; a bounded FIFO of waiters handed the slot in turn."""

    def __init__(self, max_queue: int, queue_timeout_s: float):
        self.max_queue, self.queue_timeout_s = max_queue, queue_timeout_s
        self.busy = False
        self.waiters: deque[asyncio.Future] = deque()
        self.service_s = 2.0                       # running mean of time in the slot, for Retry-After

    def retry_after(self) -> int:
        return int(min(120, max(1, math.ceil(self.service_s * (len(self.waiters) + 1)))))

    async def acquire(self, receive) -> None:
        """Take the slot, or wait for it in line; raises Busy (queue full, waited too long) or Disconnected."""
        if not self.busy:
            self.busy = True
            return
        if len(self.waiters) >= self.max_queue:
            raise Busy(f"the model is busy and {len(self.waiters)} requests are waiting; try again later",
                       self.retry_after())
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({fut, watch}, timeout=self.queue_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:                           # cancelled from outside (shutdown)
            watch.cancel()
            self._abandon(fut)
            raise
        gone = watch.done()
        if gone and not watch.cancelled():
            watch.exception()                           # retrieve it (None, or the receive error)
        watch.cancel()
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            raise fut.exception()                       # turned away (server shutting down)
        if fut.done() and not gone:
            return                                      # handed the slot
        self._abandon(fut)
        if gone:
            raise Disconnected()
        raise Busy(f"the request waited {self.queue_timeout_s:.0f} s for the model; try again later",
                   self.retry_after())

    def _abandon(self, fut: asyncio.Future) -> None:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release()                              # handed the slot but leaving: pass it on
        else:
            fut.cancel()
            if fut in self.waiters:
                self.waiters.remove(fut)

    def fail_waiters(self, exc: Exception) -> None:
        """Turn every waiter away with ``exc`` (shutdown); the running request keeps the slot."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def release(self, held_s: float | None = None) -> None:
        if held_s is not None:
            self.service_s = 0.8 * self.service_s + 0.2 * held_s
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)                    # the slot passes on; busy stays True
                return
        self.busy = False


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
