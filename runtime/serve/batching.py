"""The server with continuous batching (``--max-batch N`` > 1): requests join ``scheduler.Scheduler``'s batch.

With ``max_batch`` 1 the server keeps ``slot.Slot`` (one request at a time, ``max_queue`` waiting). With more:

* the scheduler's waiting list is the queue: a request is gated and its prompt prepared on the model thread,
  then submitted; when ``max_queue`` requests already wait it is answered 503 with ``Retry-After``
  (``scheduler.QueueFull``). A refused image (policy ``refuse``) never reaches the scheduler. The queue timeout
  does not apply (a batched request starts as soon as a slot frees; its response may already be streaming).
* each request waits for its text pieces on its own thread (:data:`BatchJob`'s pool, one per running or
  waiting request), never on the model thread, so a slow client stalls nobody; a client that disconnects
  cancels its sequence, which leaves the batch at the next step (``BatchStream.cancel``).
* memory is bounded by the KV slots: :func:`check_kv_memory` refuses to start when ``max_batch`` slots of
  ``context`` positions do not fit the memory available, naming the numbers.
* ``/health`` shows ``running`` and ``waiting`` sequences (:func:`health_counts`, also for one at a time), and
  with batching the scheduler's counters (``batch``: steps, mean batch, tokens decoded, seconds in decode steps
  and in prefills).
"""
from __future__ import annotations

import math
import time

from ..backends.slots import kv_slot_bytes
from ..build import _available_bytes

__all__ = ["BatchJob", "check_kv_memory", "slots_that_fit", "health_counts", "retry_after", "setup", "close"]


def setup(srv, max_batch: int) -> None:
    """Give the server ``srv`` (app.py's ``_Server``) a scheduler of ``max_batch`` slots (1: none, the slot)."""
    from concurrent.futures import ThreadPoolExecutor

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    srv.batching, srv.wait_pool, srv.service_s = max_batch > 1, None, 2.0
    if not srv.batching:
        return
    check_kv_memory(srv.pipe, max_batch)
    srv.pipe.enable_batching(max_batch, max_waiting=srv.limits["max_queue"])
    srv.wait_pool = ThreadPoolExecutor(max_workers=max_batch + srv.limits["max_queue"] + 2,
                                       thread_name_prefix="safeclip-wait")


def close(srv) -> None:
    if srv.batching and srv.pipe.scheduler is not None:
        srv.pipe.scheduler.close()
        srv.wait_pool.shutdown(wait=False, cancel_futures=True)


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


def health_counts(srv) -> dict:
    """``running``, ``waiting`` and ``max_batch`` for ``/health``."""
    sched = srv.pipe.scheduler if srv.batching else None
    if sched is None:
        return {"running": int(srv.slot.busy), "waiting": len(srv.slot.waiters), "max_batch": 1}
    st = sched.stats()
    return {"running": st["running"], "waiting": st["waiting"], "max_batch": st["max_batch"],
            "batch": {k: st[k] for k in ("steps", "mean_batch", "decoded_tokens", "decode_s", "prefill_s")}}


def retry_after(srv) -> int:
    """Seconds until a waiting place likely frees: the mean answer time per batch of waiting requests."""
    st = srv.pipe.scheduler.stats()
    return int(min(120, max(1, math.ceil(srv.service_s * (st["waiting"] / st["max_batch"] + 1)))))


class BatchJob:
    """One request's place in the batch: its AnswerStream, whose pieces are awaited on a pool thread;
    ``close`` cancels an unfinished sequence (it leaves at the next step) and is idempotent. ``end`` is what
    :meth:`next_piece` returns once the stream is done (app.py's marker)."""

    def __init__(self, srv, stream, t0: float, end):
        self.srv, self.stream, self.t0, self.end = srv, stream, t0, end
        self.it = iter(stream)
        self.finished = self.closed = False

    async def next_piece(self):
        import asyncio

        piece = await asyncio.get_running_loop().run_in_executor(self.srv.wait_pool, next, self.it, self.end)
        self.finished = piece is self.end
        return piece

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        text = getattr(self.stream, "_text_stream", None)
        if not self.finished and text is not None and hasattr(text, "cancel"):
            text.cancel()
        held = time.perf_counter() - self.t0
        self.srv.service_s = 0.8 * self.srv.service_s + 0.2 * held
