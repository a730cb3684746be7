"""Many sequences in one KV arena: what ``scheduler.Scheduler`` drives. :class:`SlotDecoder` (ONNX Runtime, CPU
and CUDA providers) here, ``trt.TrtSlotDecoder`` (TensorRT) on the same :class:`SlotOps`; ``pick.slot_decoder`` picks the one for a decoder.

The arena (``arena.py``) gets a slot dimension: tensor j is [slots, KVH, Lb, Hd], packed for one bucket Lb
shared by every slot; slot s holds its own sequence in rows 0..len(s)-1 of its KVH head blocks, each
with its own valid length. Operations:

* :meth:`SlotOps.prefill` (slot, prompt): the prompt alone, B = 1, on an empty past (Lb = 0), exactly
  the call a one-sequence decoder's ``prefill`` makes (same shapes, so the same logits and KV rows). Its new
  rows land in a one-slot scratch ([KVH, C, Hd] per tensor) and are copied to the slot's rows.
  :meth:`SlotOps.extend` appends a chunk to one slot (B = 1, past = that slot's [1, KVH, Lb, Hd],
  which is dense in the packed layout): chunked prefill, so a long prompt does not stall the batch.
* :meth:`SlotOps.decode` (embeds [B, D]): one token for each of slots 0..B-1 in one graph call;
  ``attention_mask`` [B, Lb+1] is 1 on each row's own 0..len-1, 0 from its length to Lb, 1 on the new
  position; ``position_ids`` [B, 1] = each slot's length. Each row's new K/V goes to its own row offset (one
  numpy fancy-indexed assignment on the host; on a GPU one ``cudaMemcpy2DAsync`` per layer key/value and per
  run of slots at the same length, ``DeviceArena.scatter_from``).
* :meth:`SlotOps.move` / :meth:`SlotOps.free`: the scheduler keeps the running sequences in slots
  0..n-1 (a leaving sequence's slot takes the last running one, one copy of that sequence's rows), so a
  step binds exactly the n running sequences.

Why B = the running sequences rather than all slots with the idle ones masked: a step's cost grows with B
(``scripts/bench_serve.py --steps``; at the TinyLlama-1.1B shape on 2 CPU cores a B = 8 step took 1.7x a
B = 1 step, BENCHMARKS.md), so computing idle rows would slow every step of a partly full batch (one running
sequence would pay the B = 8 step), while compaction costs one copy of a sequence's rows when it leaves.
On TensorRT the one-token step of 1..N sequences runs in one profile (``export/targets.py``'s ``decode``, batch
1..N: a batch that grows or shrinks never switches profiles); prefill and extension stay at batch 1 in their own.

Memory: slots x 2L x KVH x C x Hd in the cache dtype (:func:`kv_slot_bytes` per slot), plus one slot of
scratch. The bucket is shared: every slot's attention reads Lb >= the longest running sequence's rows
(masked rows weigh 0), and the bucket returns to 0 when every slot is free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .arena import check_kv_arrays
from ..graph_spec import KVSpec
from .base import ContextError
from .ort import OrtDecoder

__all__ = ["SlotOps", "SlotDecoder", "kv_slot_bytes"]


def kv_slot_bytes(kv: KVSpec, capacity: int) -> int:
    """Bytes of one slot's KV cache: every layer's key and value, ``capacity`` positions."""
    return kv.position_bytes * capacity


def decode_step(token_embeds, slots: int, hidden_size: int, lengths: np.ndarray,
                capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [B, D], a copy of the cached lengths [B] of slots 0..B-1) for one batched decode step, checked:
    1 <= B <= ``slots``, every slot 0..B-1 holds a sequence, and one more token fits ``capacity``
    (``ContextError``). Every slot decoder's ``decode`` starts here."""
    e = np.asarray(token_embeds)
    B = e.shape[0] if e.ndim == 2 else 0
    if not 1 <= B <= slots or e.shape[-1] != hidden_size:
        raise ValueError(f"token embeddings must be [B, {hidden_size}] with 1 <= B <= {slots}, got {list(e.shape)}")
    P = lengths[:B].copy()
    if P.min() < 1:
        raise ValueError(f"slot {int(np.argmin(P))} holds no sequence")
    if P.max() + 1 > capacity:
        raise ContextError(f"slot {int(np.argmax(P))}: {int(P.max())} cached + 1 new token exceed the cache "
                           f"capacity {capacity}")
    return e, P


class SlotOps:
    """The slot methods of a batched decoder, over a backend's four moves (``_call``, ``_place``, ``_scatter``,
    ``_read_slot``) and ``self.arena`` (slots x KVH head blocks). A subclass sets ``slots``, ``capacity``,
    ``hidden_size``, ``vocab_size``, ``dtype``, ``kv`` and calls :meth:`_init_slots`."""

    def _init_slots(self) -> None:
        C = self.arena.capacity                 # >= capacity: an aligned arena's buckets reach it rounded up
        self.lengths = np.zeros(self.slots, np.int64)
        self._bmask = np.zeros(max(self.slots * (C + 1), 2 * C + 1), np.int64)   # [B, Lb+S]: decode or one slot
        self._bpos = np.zeros(max(self.slots, C), np.int64)                      # [B, 1] or [1, S]
        self.length = 0
        self.decode_copies = 0                  # device copies of the decode steps' new rows (benchmarks)

    # -- backend moves -------------------------------------------------------------------------------------
    def _call(self, x: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int, lb: int) -> np.ndarray:
        """One graph call: ``x`` [B, S, D], past [B, KVH, lb, Hd] at byte offset ``past`` of every slab, new
        rows into the scratch; returns the logits [B, V] (a view)."""
        raise NotImplementedError

    def _place(self, s: int, at: int, S: int) -> None:
        """The scratch's S rows of one slot ([tensors, KVH, S, Hd]) -> rows at..at+S-1 of slot ``s``."""
        raise NotImplementedError

    def _scatter(self, P: np.ndarray) -> None:
        """The scratch's one row per slot 0..B-1 -> row ``P[b]`` of slot b."""
        raise NotImplementedError

    def _read_slot(self, s: int, n: int) -> list[np.ndarray]:
        raise NotImplementedError

    def _load_slot(self, s: int, arrays: Sequence[np.ndarray]) -> None:
        """Host ``arrays`` ([1, KVH, n, Hd] per tensor) -> rows 0..n-1 of slot ``s`` (the bucket holds n)."""
        raise NotImplementedError

    # -- the one-sequence interface is not this decoder's -----------------------------------------------------
    def _one(self, *_a, **_k):
        raise TypeError("a slot decoder runs sequences in slots: use prefill(slot, x), extend(slot, x), decode(x)")

    decode_one_token = kv_read = kv_write = truncate = cache = _one

    @property
    def kv_bytes(self) -> int:
        return self.slots * kv_slot_bytes(self.kv, self.capacity)

    def reset(self, length: int = 0) -> None:
        """Free every slot."""
        if length:
            raise ValueError("a slot decoder resets to empty slots only")
        self.lengths[:] = 0
        self.arena.bucket = 0

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        return int(slot)

    def _embeds(self, x) -> np.ndarray:
        x = np.asarray(x)
        x = np.ascontiguousarray(x.reshape(1, -1, x.shape[-1]), dtype=self.dtype)        # [1, S, D]
        if x.shape[-1] != self.hidden_size or x.shape[1] < 1:
            raise ValueError(f"embeddings must be [S, {self.hidden_size}], got {list(x.shape[1:])}")
        return x

    # -- slots -----------------------------------------------------------------------------------------------
    prefill_max: int | None = None      # most tokens one prefill call takes (TensorRT's prefill profile); None: all

    def prefill(self, slot: int, inputs_embeds) -> np.ndarray:
        """Run a prompt [S, D] alone into the empty ``slot``; returns the last logits [V] (a copy). A prompt
        longer than ``prefill_max`` goes on in extensions (chunked prefill)."""
        s, x = self._check_slot(slot), self._embeds(inputs_embeds)
        S = x.shape[1]
        if S > self.capacity:
            raise ContextError(f"{S} new tokens exceed the cache capacity {self.capacity}")
        if self.prefill_max and S > self.prefill_max:
            self.prefill(s, x[:, :self.prefill_max])
            return self.extend(s, x[:, self.prefill_max:])
        self.lengths[s] = 0
        mask = self._bmask[:S].reshape(1, S)
        mask[:] = 1
        pos = self._bpos[:S].reshape(1, S)
        pos[0] = np.arange(S)
        logits = self._call(x, mask, pos, 0, 0)[0].copy()
        self._place(s, 0, S)
        self.lengths[s] = S
        return logits

    def extend(self, slot: int, inputs_embeds) -> np.ndarray:
        """Append S tokens [S, D] to ``slot``'s sequence (B = 1: chunked prefill); returns the last logits [V]."""
        s, x = self._check_slot(slot), self._embeds(inputs_embeds)
        P, S = int(self.lengths[s]), x.shape[1]
        if P == 0:
            return self.prefill(s, x)
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        E = self.extend_max
        if S > E:                                                           # what one call's profile takes
            for i in range(0, S, E):
                logits = self.extend(s, x[:, i:i + E])
            return logits
        a = self.arena
        Lb = a.bucket
        mask = self._bmask[:Lb + S].reshape(1, Lb + S)
        a.mask(mask[0], P, S)
        pos = self._bpos[:S].reshape(1, S)
        pos[0] = np.arange(P, P + S)
        block = s * a.kvh * Lb * a.row                                      # slot s's [KVH, Lb, Hd], dense
        logits = self._call(x, mask, pos, block, Lb)[0].copy()
        self._place(s, P, S)
        self.lengths[s] = P + S
        return logits

    def decode(self, token_embeds) -> np.ndarray:
        """One token [B, D] for each of slots 0..B-1 (all holding a sequence) in one graph call; returns the
        next logits [B, V] (a view, valid until the next call)."""
        e, P = decode_step(token_embeds, self.slots, self.hidden_size, self.lengths, self.capacity)
        B = len(P)
        a = self.arena
        Lb = a.bucket
        x = np.ascontiguousarray(e.reshape(B, 1, -1), dtype=self.dtype)
        cols = np.arange(Lb + 1)
        mask = self._bmask[: B * (Lb + 1)].reshape(B, Lb + 1)
        mask[:] = (cols[None] < P[:, None]) | (cols[None] == Lb)
        pos = self._bpos[:B].reshape(B, 1)
        pos[:, 0] = P
        logits = self._call(x, mask, pos, 0, Lb)
        self._scatter(P)
        self.lengths[:B] += 1
        return logits

    def move(self, src: int, dst: int) -> None:
        """Move ``src``'s sequence to the free slot ``dst`` (``src`` is free afterwards)."""
        src, dst = self._check_slot(src), self._check_slot(dst)
        if src != dst:
            n = int(self.lengths[src])
            self.arena.move_slot(src, dst, n)
            self.lengths[dst], self.lengths[src] = n, 0

    def free(self, slot: int) -> None:
        self.lengths[self._check_slot(slot)] = 0
        if not self.lengths.any():
            self.arena.bucket = 0

    def slot_write(self, slot: int, arrays: Sequence[np.ndarray]) -> None:
        """Fill ``slot`` with a cached prefix (``slot_read``'s or ``kv_read``'s arrays: [1, KVH, n, Hd] each, in
        the KV order of ``graph_spec.KVSpec``); afterwards it holds n positions (a prefix-cache restore)."""
        s = self._check_slot(slot)
        a = self.arena
        n = check_kv_arrays(arrays, a.tensors, a.kvh, a.hd, a.dtype, self.capacity)
        self.lengths[s] = 0
        self._load_slot(s, arrays)
        self.lengths[s] = n

    def slot_read(self, slot: int) -> list[np.ndarray]:
        """Host copies of ``slot``'s cached rows, [1, KVH, len, Hd] each, in ``graph_spec.KVSpec``'s order (tests)."""
        s = self._check_slot(slot)
        return self._read_slot(s, int(self.lengths[s]))


class SlotDecoder(SlotOps, OrtDecoder):
    """An :class:`OrtDecoder` whose arena holds ``slots`` sequences of up to ``capacity`` tokens each, on the
    host (``device="cpu"``) or in device memory (``device="cuda"``: the CUDA provider reads and writes the
    arena in place, moved with cuda-python copies as ``OrtDecoder``'s one-sequence arena is).

    Takes ``OrtDecoder``'s arguments. The one-sequence methods (``prefill(x)``, ``decode_one_token``, ...) are
    not available: sequences go through the slot methods (module docstring). ``session`` reuses an open
    ``InferenceSession`` (the pipeline's one-sequence decoder's: the weights are loaded once)."""

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, slots: int, session=None, **kw):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = int(slots)
        super().__init__(onnx_path, kv, capacity=capacity, session=session, **kw)
        self.extend_max = self.capacity                                  # the scratch holds a whole slot
        self._init_slots()
        self._blogits = np.zeros((self.slots, 1, self.vocab_size), self.dtype)

    def _alloc_kv(self, T: int, H: int, D: int, slots: int = 1, rows: int | None = None) -> None:
        # rows: one slot's prompt (a prefill's new rows) or one row per slot (a decode step's)
        super()._alloc_kv(T, H, D, slots=self.slots, rows=max(self.capacity, self.slots))

    @classmethod
    def sharing(cls, dec: OrtDecoder, slots: int, capacity: int | None = None) -> "SlotDecoder":
        """A slot decoder on ``dec``'s open session (same graph, weights loaded once; same device)."""
        if not hasattr(dec, "session"):
            raise ValueError("batched decoding on ONNX Runtime needs an OrtDecoder to share its session")
        if dec.device == "cuda":                       # its own buffer list on the same bindings: close() frees only its own
            from .cuda import CudaRuntime
            kw = {"cuda": CudaRuntime(dec.cuda.rt)}
        else:
            kw = {}
        return cls("", dec.kv, capacity=capacity or dec.capacity, slots=slots, session=dec.session,
                   names=dec.names, weights_bytes=dec.weights_bytes, device=dec.device, **kw)

    def _call(self, x, mask, pos, past, lb):
        io, dt, n, dev = self._io, self.dtype, self.names, self.device
        B, S = x.shape[0], x.shape[1]
        H, D = self.kv.num_kv_heads, self.kv.head_dim
        io.bind_input(n.inputs_embeds, "cpu", 0, dt, [B, S, self.hidden_size], x.ctypes.data)
        io.bind_input(n.attention_mask, "cpu", 0, np.int64, list(mask.shape), mask.ctypes.data)
        io.bind_input(n.position_ids, "cpu", 0, np.int64, list(pos.shape), pos.ctypes.data)
        for j, (p, o) in enumerate(self._names):
            io.bind_input(p, dev, 0, dt, [B, H, lb, D], self.arena.ptr(j) + past)
            io.bind_output(o, dev, 0, dt, [B, H, S, D], self._scratch_ptr[j])
        logits = self._blogits[:B]
        io.bind_output(n.logits, "cpu", 0, dt, [B, 1, self.vocab_size], logits.ctypes.data)
        if dev != "cpu":
            self.cuda.sync(self._stream)                # the arena's copies land before ORT reads it
        self.session.run_with_iobinding(io)
        return logits[:, 0]

    # On the device these moves are queued on the arena's stream; ``_call`` syncs it before ORT reads the arena.
    def _place(self, s, at, S):
        a = self.arena
        a.ensure(int(self.lengths.max()), at + S)
        if self.device == "cpu":
            a.place(s, at, self._scratch[:, : a.kvh * S * a.hd].reshape(a.tensors, a.kvh, S, a.hd))
        else:
            a.place_from(s, at, self._scratch_ptr, S)

    def _scatter(self, P):
        a = self.arena
        a.ensure(int(self.lengths.max()), int(P.max()) + 1)
        if self.device == "cpu":
            B = len(P)
            a.scatter(P, self._scratch[:, : B * a.kvh * a.hd].reshape(a.tensors, B * a.kvh, a.hd))
        else:
            self.decode_copies += a.scatter_from(P, self._scratch_ptr)

    def _read_slot(self, s, n):
        if self.device == "cpu":
            return self.arena.read_slot(s, n)
        return self.arena.read_slot(s, n, self._host)

    def _load_slot(self, s, arrays):
        a, n = self.arena, arrays[0].shape[2]
        a.ensure(int(self.lengths.max()), max(n, 1))
        if self.device == "cpu":
            a.place(s, 0, np.stack([np.asarray(x).reshape(a.kvh, n, a.hd) for x in arrays]))
        else:
            a.load_slot(s, arrays, self._host)

