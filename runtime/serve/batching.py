"""The server with continuous batching (``--max-batch N`` > 1): requests join ``scheduler.Scheduler``'s batch.

With ``max_batch`` 1 the server admits one request at a time (``admission.OneAtATime``). With more (:class:`Batched`):

* the scheduler's waiting list is the queue: a request is gated and its prompt prepared on the model thread,
  then submitted; when ``max_queue`` requests already wait it is answered 503 with ``Retry-After``
  (``scheduler.QueueFull``). A refused image (policy ``refuse``) never reaches the scheduler. The queue timeout
  does not apply (a batched request starts as soon as a slot frees; its response may already be streaming).
* each request waits for its text pieces on its own thread (:class:`Batched`'s pool, one per running or
  waiting request), never on the model thread, so a slow client stalls nobody; a client that disconnects
  cancels its sequence, which leaves the batch at the next step (``BatchStream.cancel``).
* memory is bounded by the KV slots: :func:`check_kv_memory` refuses to start when ``max_batch`` slots of
  ``context`` positions do not fit the memory available, naming the numbers.
* ``/health`` shows ``running`` and ``waiting`` sequences (``health()``, also for one at a time), and
  with batching the scheduler's counters (``batch``: steps, mean batch, tokens decoded, seconds in decode steps
  and in prefills).
"""
from __future__ import annotations

import time

from ..backends.slots import kv_slot_bytes
from ..host_memory import available_bytes as _available_bytes
from ..scheduler import QueueFull
from .admission import Busy, Job, ServiceTime

__all__ = ["Batched", "check_kv_memory", "slots_that_fit"]


class Batched:
    """``max_batch`` > 1 (the admission face of ``admission.py``): the pipeline's scheduler decodes up to
    ``max_batch`` requests together; its waiting list (``max_queue``) is the queue. ``begin()`` gates and prepares
    a request on the model thread and submits it (``scheduler.QueueFull``: :class:`~.admission.Busy`); its pieces
    are awaited on a pool thread of its own, never the model thread; closing an unfinished job cancels its
    sequence (it leaves the batch at the next step)."""

    batched = True

    def __init__(self, pipe, run, max_batch: int, max_queue: int):
        from concurrent.futures import ThreadPoolExecutor

        check_kv_memory(pipe, max_batch)
        self.pipe, self.run, self.service = pipe, run, ServiceTime()
        self.scheduler = pipe.enable_batching(max_batch, max_waiting=max_queue)
        self.wait_pool = ThreadPoolExecutor(max_workers=max_batch + max_queue + 2, thread_name_prefix="safeclip-wait")

    async def start(self, receive, begin) -> Job:
        t0 = time.perf_counter()
        try:
            stream = await self.run(begin)
        except QueueFull as e:
            st = self.scheduler.stats()
            raise Busy(str(e), self.service.retry_after(st["waiting"], st["max_batch"])) from None
        return Job(stream, t0, self._step, lambda finished, held_s: self._close(stream, finished, held_s))

    async def _step(self, fn, *args):
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(self.wait_pool, fn, *args)

    def _close(self, stream, finished: bool, held_s: float) -> None:
        if not finished:
            stream.cancel()
        self.service.add(held_s)

    def health(self) -> dict:
        st = self.scheduler.stats()
        return {"busy": False, "queued": 0, "running": st["running"], "waiting": st["waiting"],
                "max_batch": st["max_batch"],
                "batch": {k: st[k] for k in ("steps", "mean_batch", "decoded_tokens", "decode_s", "prefill_s")}}

    def fail_waiters(self, exc: Exception) -> None:
        pass                                        # waiting sequences are the scheduler's: they finish or time out

    def close(self) -> None:
        self.scheduler.close()
        self.wait_pool.shutdown(wait=False, cancel_futures=True)


def check_kv_memory(pipe, max_batch: int, available: int | None = None) -> int:
    """Bytes the ``max_batch`` KV slots take (each the decoder's capacity); ``ValueError`` when they do not
    fit ``available`` bytes (default: MemAvailable; the weights are already loaded)."""
    dec = pipe.language_model.decoder
    per = kv_slot_bytes(dec.kv, dec.capacity)
    need = per * (max_batch + 1)                                  # the slots and one slot of prefill scratch
    avail = _memory_for_kv(dec) if available is None else available
    if avail is not None and need > avail:
        fit = max(0, avail // per - 1)
        raise ValueError(f"--max-batch {max_batch} x --context {dec.capacity} needs {need / 2**20:.1f} MiB of KV "
                         f"cache ({per / 2**20:.2f} MiB per sequence, plus one for prefill) but "
                         f"{avail / 2**20:.1f} MiB are available; lower --max-batch (at most {fit} fit) or --context")
    return need


def _memory_for_kv(dec) -> int | None:
    """Where the decoder's KV slots go: free device memory for a GPU decoder (``cudaMemGetInfo``: on a Jetson
    the shared DRAM), else MemAvailable."""
    cuda = getattr(dec, "cuda", None)
    if getattr(dec, "device", "cpu") != "cpu" and cuda is not None:
        return cuda.mem_info()[0]
    return _available_bytes()


def slots_that_fit(pipe, available: int | None = None) -> int:
    """How many KV slots (plus the prefill one) fit ``available`` bytes (default MemAvailable; unknown: many)."""
    dec = pipe.language_model.decoder
    avail = _memory_for_kv(dec) if available is None else available
    return 1 << 30 if avail is None else max(0, avail // kv_slot_bytes(dec.kv, dec.capacity) - 1)
