"""Admission to the model: how a request gets its :class:`Job`, one at a time (:class:`OneAtATime`, here) or
batched (``batching.Batched``). Both have the same face: ``await start(receive, begin)`` returns the request's
:class:`Job` or raises :class:`Busy` (503 with ``Retry-After``) or :class:`Disconnected`; ``health()`` gives
``/health``'s counts; ``fail_waiters`` and ``close`` serve shutdown. Retry-After comes from one running mean of
the time a request holds the model (:class:`ServiceTime`).

One at a time (the :class:`Slot`): one request runs, at most ``max_queue`` wait in arrival order. A waiter is
handed the slot directly by ``release`` (no race for it), gives up after ``queue_timeout_s`` (:class:`Busy`),
and leaves the line at once when its client disconnects (:class:`Disconnected`), watched through the ASGI
``receive`` channel; ``fail_waiters`` turns the whole line away at shutdown. Single event loop, no locks needed.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Awaitable, Callable

END = object()                                     # what Job.next_piece returns once the answer is complete


class Busy(Exception):
    """The queue is full or the wait was too long: answer 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Disconnected(Exception):
    """The client went away while waiting for the model."""


class ServiceTime:
    """Running mean of the seconds a request holds the model (2 s before the first), and the ``Retry-After``
    it implies: the time until a waiting place likely frees, ``ceil(mean x (waiting / per_turn + 1))`` within
    1..120 s, ``per_turn`` the requests served together (the batch)."""

    def __init__(self, initial_s: float = 2.0):
        self.mean_s = initial_s

    def add(self, held_s: float) -> None:
        self.mean_s = 0.8 * self.mean_s + 0.2 * held_s

    def retry_after(self, waiting: int, per_turn: int = 1) -> int:
        return int(min(120, max(1, math.ceil(self.mean_s * (waiting / per_turn + 1)))))


class Job:
    """One request's hold on the model: its answer stream (``stream``), whose pieces ``next_piece`` awaits
    through ``step`` (``step(next, iterator, END)`` on the thread that may run it); ``close`` is idempotent and
    calls ``on_close(finished, held_s)`` once, which gives the model back."""

    def __init__(self, stream, t0: float, step: Callable[..., Awaitable], on_close: Callable[[bool, float], None]):
        self.stream, self.t0, self.step, self.on_close = stream, t0, step, on_close
        self.it = iter(stream)
        self.finished = self.closed = False

    async def next_piece(self):
        piece = await self.step(next, self.it, END)
        self.finished = piece is END
        return piece

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_close(self.finished, time.perf_counter() - self.t0)


class Slot:
    """One model, one request at a time; a bounded FIFO of waiters handed the slot in turn."""

    def __init__(self, max_queue: int, queue_timeout_s: float, service: ServiceTime | None = None):
        self.max_queue, self.queue_timeout_s = max_queue, queue_timeout_s
        self.busy = False
        self.waiters: deque[asyncio.Future] = deque()
        self.service = service or ServiceTime()

    def retry_after(self) -> int:
        return self.service.retry_after(len(self.waiters))

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
            self.service.add(held_s)
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)                    # the slot passes on; busy stays True
                return
        self.busy = False


class OneAtATime:
    """``max_batch`` 1: the :class:`Slot`; the job's answer is stepped on the model thread (``run``), and an
    unfinished one is closed there after the step in flight (a generator is closed where it runs)."""

    batched = False

    def __init__(self, run: Callable[..., Awaitable], executor, max_queue: int, queue_timeout_s: float):
        self.run, self.executor = run, executor
        self.slot = Slot(max_queue, queue_timeout_s)

    async def start(self, receive, begin: Callable[[], object]) -> Job:
        """Wait for the slot, then ``begin()`` on the model thread (the gated answer stream) as a :class:`Job`."""
        await self.slot.acquire(receive)
        t0 = time.perf_counter()
        try:
            stream = await self.run(begin)
        except BaseException:
            self.slot.release(time.perf_counter() - t0)
            raise
        job = Job(stream, t0, self.run, lambda finished, held_s: self._close(job, finished, held_s))
        return job

    def _close(self, job: Job, finished: bool, held_s: float) -> None:
        if not finished:
            try:
                self.executor.submit(job.it.close)
            except RuntimeError:                        # executor already shut down (server stopping)
                pass
        self.slot.release(held_s)

    def health(self) -> dict:
        return {"busy": self.slot.busy, "queued": len(self.slot.waiters), "running": int(self.slot.busy),
                "waiting": len(self.slot.waiters), "max_batch": 1}

    def fail_waiters(self, exc: Exception) -> None:
        self.slot.fail_waiters(exc)

    def close(self) -> None:
        pass


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
