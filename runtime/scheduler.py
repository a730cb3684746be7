"""Continuous batching: one scheduler thread decodes up to ``max_batch`` sequences together in one graph call.

    sched = Scheduler(SlotDecoder(..., slots=8), embed_table, max_waiting=32)
    s = sched.submit(prompt_embeds, tokenizer=tok, max_new_tokens=64, eos_token_ids=[2], seed=1)
    for piece in s:           # text pieces as the batch generates them (same interface as generate.TextStream)
        ...
    s.result                  # a generate.GenerationResult; s.cancel() leaves the batch at the next step

What a step does (the scheduler thread, nobody else touches the decoder):

1. Sequences cancelled since the last step (``cancel()``, or a stream dropped unfinished: a client gone) leave;
   their slots are freed (``SlotDecoder``: the last running sequence moves into the hole).
2. Waiting sequences are admitted while slots are free (in arrival order, up to ``prefill_budget`` prompt
   tokens per step): each prompt is prefilled alone into its slot (B = 1, the same call a one-sequence
   decoder makes) and its first token picked; it joins the running batch for the next step. Admitting every
   arrival before the next step keeps the batch full and the time to first token of the last of N arrivals
   at N prefills (one per step would add N-1 decode steps of the growing batch). With ``prefill_chunk`` a
   longer prompt is prefilled ``prefill_chunk`` tokens per step instead, between decode steps, so it does not
   stall the batch for the whole prompt. A request submitted with ``prefix_keys`` and a ``prefix_cache``
   (``prefix_cache.PrefixCache``: a conversation turn, ``chat.py``) first restores the longest cached prefix
   of its keys into its slot (``slot_write``) and prefills only the rest; when it finishes, its slot's KV
   (prompt and answer) is snapshotted there (``slot_read``), as a one-sequence turn's is.
3. One decode step of every running sequence ([B, D] embeddings -> [B, V] logits, B = running sequences).
   Each sequence picks its token with its own sampler (``generate.picker``: its own seeded Generator, so
   the same seed gives the same tokens as alone, and its own grammar constraint when it has one) and turns it into text with its own ``generate.Progress``
   (detokenization, EOS, stop strings, budget: the very code ``TextStream`` runs). A finished sequence
   leaves at once.

Faults: an exception in one sequence's detokenization, stop handling or ``on_token`` ends that sequence with
:class:`SequenceError` (its stream raises it), never the batch; a failing graph call ends the sequences in
it. A prompt that cannot fit a slot raises ``ContextError`` in :meth:`Scheduler.submit`, before it joins;
a full waiting list raises :class:`QueueFull`. Requests talk to the scheduler through thread-safe queues only.
Standard library + numpy.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator, Sequence

import numpy as np

from .generate import GenerationResult, Progress, budget, picker, timings
from .error_text import one_line

__all__ = ["Scheduler", "BatchStream", "QueueFull", "SequenceError"]

_END = object()


class QueueFull(RuntimeError):
    """The scheduler's waiting list is full: retry later."""


class SequenceError(RuntimeError):
    """One sequence ended with an error (the others go on)."""


class _Seq:
    """What the scheduler keeps of one request (the stream the caller holds is apart: dropping it cancels)."""

    def __init__(self, embeds, prog: Progress, pick, on_token):
        self.embeds, self.prog, self.pick, self.on_token = embeds, prog, pick, on_token
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.done = False
        self.slot = -1
        self.fed = 0                                   # prompt tokens prefilled (chunked prefill)
        self.keys: np.ndarray | None = None            # what each prompt position holds (prefix cache)
        self.pc = None                                 # the prefix cache to restore from and snapshot to
        self.cached = 0                                # prompt tokens restored from it
        self.fed_ids: list[int] = []                   # generated tokens fed back, in order
        self.token = -1                                # the last picked token, fed at the next step
        self.t0 = self.t1 = 0.0
        self.result: GenerationResult | None = None

    def finish(self, reason: str | None = None) -> None:
        p = self.prog
        end = time.perf_counter()
        t1 = self.t1 or end
        self.result = GenerationResult(token_ids=list(p.ids), text=p.text, finish_reason=reason or p.reason,
                                       prompt_tokens=int(self.embeds.shape[0]),
                                       timings=timings(t1 - (self.t0 or t1), end - t1, len(p.ids)))
        self.done = True
        self.out.put(_END)

    def fail(self, err: BaseException) -> None:
        self.done = True
        self.out.put(SequenceError(f"sequence ended by an error: {one_line(err)}"))


class BatchStream:
    """A request's text pieces as the scheduler generates them (``generate.TextStream``'s interface)."""

    def __init__(self, seq: _Seq, sched: "Scheduler"):
        self._seq, self._sched, self._started, self._ended = seq, sched, False, False

    @property
    def result(self) -> GenerationResult:
        if self._seq.result is None or not self._ended:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._seq.result

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens restored from the prefix cache instead of prefilled (0 until the prefill)."""
        return int(self._seq.cached)

    def cancel(self) -> None:
        """Leave the batch at the next step (no effect once finished)."""
        self._seq.cancelled = True
        self._sched._wake()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a BatchStream can be iterated once")
        self._started = True
        try:
            while True:
                item = self._seq.out.get()
                if item is _END:
                    self._ended = True
                    return
                if isinstance(item, BaseException):
                    self._ended = True
                    raise item
                yield item
        finally:
            if not self._ended:
                self.cancel()

    def __del__(self):
        if not self._seq.done:
            self._seq.cancelled = True


class Scheduler:
    """Drives a ``backends.slots.SlotDecoder`` (``slots`` = the most sequences decoded together) from one
    thread; ``embed_table`` [V, D] gives each fed token's embedding. ``max_waiting`` bounds the waiting list
    (None: unbounded); ``prefill_chunk`` (None: whole prompts) is the most tokens of one prompt prefilled per
    step; ``prefill_budget`` (None: no limit) the most prompt tokens admitted before a step (the first
    admission always goes ahead)."""

    def __init__(self, decoder, embed_table: np.ndarray, *, max_waiting: int | None = None,
                 prefill_chunk: int | None = None, prefill_budget: int | None = None,
                 name: str = "safeclip-batch"):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.dec, self.table = decoder, embed_table
        self.max_batch, self.capacity = int(decoder.slots), int(decoder.capacity)
        self.max_waiting, self.prefill_chunk, self.prefill_budget = max_waiting, prefill_chunk, prefill_budget
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []                 # running[i].slot == i
        self._prefilling: _Seq | None = None           # a chunked prefill under way, in slot len(running)
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0                                 # decode steps run
        self.batched = 0                               # sequence-steps run (steps x their B): tokens decoded
        self.decode_s = self.prefill_s = 0.0           # time in decode steps and in prefill calls
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, prompt_embeds, *, tokenizer, max_new_tokens: int, eos_token_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None,
               on_token: Callable[[int, str], None] | None = None, prefix_keys: Sequence[int] | None = None,
               prefix_cache=None, constraint=None) -> BatchStream:
        """Queue one sequence (prompt embeddings [S, D]; ``generate.generate``'s keyword arguments, ``constraint``
        (a ``grammar.Constraint``) included);
        ``prefix_keys`` ([S], what each position holds) with ``prefix_cache`` reuse and feed a prefix cache.

        Raises before it joins: ``ContextError`` when the prompt does not fit a slot, ``ValueError`` on a bad
        argument, :class:`QueueFull` when the waiting list is full, ``RuntimeError`` after :meth:`close`."""
        x = np.asarray(prompt_embeds)
        x = x.reshape(-1, x.shape[-1])                                              # [S, D]
        n, clamped = budget(x.shape[0], self.capacity, max_new_tokens)
        prog = Progress(tokenizer, n, clamped, frozenset(int(e) for e in eos_token_ids), list(stop_strings),
                        constraint)
        seq = _Seq(x, prog, picker(temperature, top_k, top_p, seed, constraint), on_token)
        if prefix_cache is not None and prefix_cache.enabled and prefix_keys is not None:
            keys = np.asarray(prefix_keys, np.int64).reshape(-1)
            if keys.size != x.shape[0]:
                raise ValueError(f"{keys.size} prefix keys for a prompt of {x.shape[0]} positions")
            seq.keys, seq.pc = keys, prefix_cache
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the most is {self.max_waiting})")
            self._waiting.append(seq)
            self._cv.notify()
        return BatchStream(seq, self)

    def stats(self) -> dict:
        with self._cv:
            return {"running": len(self._running) + (self._prefilling is not None), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_waiting": self.max_waiting, "steps": self.steps,
                    "mean_batch": round(self.batched / self.steps, 2) if self.steps else 0.0,
                    "decoded_tokens": self.batched, "decode_s": round(self.decode_s, 3),
                    "prefill_s": round(self.prefill_s, 3)}

    @property
    def running(self) -> int:
        return self.stats()["running"]

    @property
    def waiting(self) -> int:
        return self.stats()["waiting"]

    def close(self) -> None:
        """Stop the thread; unfinished sequences end with :class:`SequenceError`."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)
        self._fail_all(RuntimeError("the scheduler was closed"))

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- the scheduler thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self._running or self._prefilling):
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self._drop_cancelled()
                self._admit_all()
                self._step()
            except Exception as e:                     # a bug here must not hang every request: end them
                self._fail_all(e)

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            seqs = [*self._running, *self._waiting, *([self._prefilling] if self._prefilling else [])]
            self._running, self._prefilling = [], None
            self._waiting.clear()
        self.dec.reset()
        for s in seqs:
            if not s.done:
                s.fail(err)

    def _leave(self, seq: _Seq) -> None:
        """Take a running sequence out; the last running one moves into its slot."""
        k = seq.slot
        last = self._running.pop()
        if last is not seq:
            self.dec.move(last.slot, k)
            last.slot, self._running[k] = k, last
        else:
            self.dec.free(k)
        seq.slot = -1

    def _drop_cancelled(self) -> None:
        with self._cv:                                 # a client gone while waiting: out of the list now
            gone = [s for s in self._waiting if s.cancelled]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            s.finish("cancelled")
        for s in [s for s in self._running if s.cancelled]:
            self._leave(s)
            s.finish("cancelled")
        p = self._prefilling
        if p is not None and p.cancelled:
            self.dec.free(p.slot)
            self._prefilling = None
            p.finish("cancelled")

    def _next_waiting(self) -> _Seq | None:
        with self._cv:
            while self._waiting:
                s = self._waiting.popleft()
                if not s.cancelled:
                    return s
                s.finish("cancelled")
        return None

    def _admit_all(self) -> None:
        budget = self.prefill_budget
        while True:
            n = self._admit()
            if not n or self._prefilling is not None:      # nothing admitted, or a chunked prefill goes on
                return
            if budget is not None:
                budget -= n
                if budget <= 0:
                    return

    def _admit(self) -> int:
        """Prefill (a chunk of) one sequence; returns the prompt tokens it prefilled (0: none waited)."""
        seq = self._prefilling
        if seq is None:
            if len(self._running) >= self.max_batch:
                return 0
            seq = self._next_waiting()
            if seq is None:
                return 0
            seq.slot, seq.t0 = len(self._running), time.perf_counter()
        S, start = seq.embeds.shape[0], seq.fed
        t = time.perf_counter()
        try:
            if seq.fed == 0 and seq.pc is not None:              # restore the longest cached prefix
                n, arrays = seq.pc.match(seq.keys, S - 1)
                if n:
                    self.dec.slot_write(seq.slot, arrays)
                    seq.fed = seq.cached = n
            end = S if self.prefill_chunk is None else min(S, seq.fed + self.prefill_chunk)
            if seq.fed == 0:
                logits = self.dec.prefill(seq.slot, seq.embeds[:end])
            else:
                logits = self.dec.extend(seq.slot, seq.embeds[seq.fed:end])
            self.prefill_s += time.perf_counter() - t
        except Exception as e:                                     # this prompt only: its slot was free
            self.dec.free(seq.slot)
            self._prefilling = None
            seq.fail(e)
            return max(1, S - start)
        seq.fed = end
        if end < S:
            self._prefilling = seq
            return end - start
        self._prefilling = None
        if self._emit(seq, logits, first=True):
            self._snapshot(seq)
            self.dec.free(seq.slot)
            return end - start
        k = len(self._running)
        if seq.slot != k:                                          # a running sequence left during its prefill
            self.dec.move(seq.slot, k)
            seq.slot = k
        self._running.append(seq)
        return end - start

    def _emit(self, seq: _Seq, logits: np.ndarray, first: bool = False) -> bool:
        """Pick the sequence's next token from its ``logits`` [V] and hand it to its text handling; True when
        the sequence has ended (finished or failed)."""
        try:
            seq.token = token = seq.pick(logits)
            if first:
                seq.t1 = time.perf_counter()
            out = seq.prog.feed(token)
            if seq.on_token is not None:
                seq.on_token(token, out)
        except Exception as e:
            seq.fail(e)
            return True
        if out:
            seq.out.put(out)
        if seq.prog.reason:
            seq.finish()
            return True
        return False

    def _snapshot(self, seq: _Seq) -> None:
        """A finished sequence's KV (prompt and fed answer tokens) into its prefix cache, if it has one. A
        failure here costs the cache entry only."""
        pc = seq.pc
        if pc is None or seq.result is None or seq.result.finish_reason == "cancelled":
            return
        keys = [int(k) for k in seq.keys] + seq.fed_ids
        try:
            if len(keys) == int(self.dec.lengths[seq.slot]) and pc.wants(keys, self.dec.kv.position_bytes):
                pc.put(keys, self.dec.slot_read(seq.slot))
        except Exception:
            pass

    def _step(self) -> None:
        run = self._running
        if not run:
            return
        ids = np.fromiter((s.token for s in run), np.int64, len(run))
        for s in run:
            if s.pc is not None:                       # the keys of its snapshot
                s.fed_ids.append(int(s.token))
        t = time.perf_counter()
        try:
            logits = self.dec.decode(np.asarray(self.table[ids], dtype=self.dec.dtype))   # [B, V]
            self.decode_s += time.perf_counter() - t
        except Exception as e:                                     # the graph call: every sequence in it
            for s in list(run):
                self._leave(s)
                s.fail(e)
            return
        self.steps += 1
        self.batched += len(run)
        ended = []
        for i, s in enumerate(run):
            if self._emit(s, logits[i]):
                ended.append(s)
        for s in ended:
            self._snapshot(s)
            self._leave(s)
