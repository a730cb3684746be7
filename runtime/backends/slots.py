"""Many sequences in one KV arena: :class:`SlotDecoder` (ONNX Runtime, CPU), what ``batch.Scheduler`` drives.

The arena (``arena.py``) gets a slot dimension: tensor j is [slots, KVH, Lb, Hd], packed for one bucket Lb
shared by every slot; slot s holds its own sequence in rows 0..len(s)-1 of its KVH head blocks, each
with its own valid length. Operations:

* :meth:`SlotDecoder.prefill` (slot, prompt): the prompt alone, B = 1, on an empty past (Lb = 0), exactly
  the call a one-sequence ``OrtDecoder.prefill`` makes (same shapes, so the same logits and KV rows). Its new
  rows land in a one-slot scratch ([KVH, C, Hd] per tensor) and are copied to the slot's rows.
  :meth:`SlotDecoder.extend` appends a chunk to one slot (B = 1, past = that slot's [1, KVH, Lb, Hd],
  which is dense in the packed layout): chunked prefill, so a long prompt does not stall the batch.
* :meth:`SlotDecoder.decode` (embeds [B, D]): one token for each of slots 0..B-1 in one graph call;
  ``attention_mask`` [B, Lb+1] is 1 on each row's own 0..len-1, 0 from its length to Lb, 1 on the new
  position; ``position_ids`` [B, 1] = each slot's length. Each row's new K/V goes to its own row offset (one
  numpy fancy-indexed assignment).
* :meth:`SlotDecoder.move` / :meth:`SlotDecoder.free`: the scheduler keeps the running sequences in slots
  0..n-1 (a leaving sequence's slot takes the last running one, one copy of that sequence's rows), so a
  step binds exactly the n running sequences.

Why B = the running sequences rather than all slots with the idle ones masked: a step's cost grows with B
(``scripts/bench_serve.py --steps``; at the TinyLlama-1.1B shape on 2 CPU cores a B = 8 step took 1.7x a
B = 1 step, BENCHMARKS.md), so computing idle rows would slow every step of a partly full batch (one running
sequence would pay the B = 8 step), while compaction costs one copy of a sequence's rows when it leaves.

Memory: slots x 2L x KVH x C x Hd in the cache dtype (:func:`kv_slot_bytes` per slot), plus one slot of
scratch. The bucket is shared: every slot's attention reads Lb >= the longest running sequence's rows
(masked rows weigh 0), and the bucket returns to 0 when every slot is free. CPU only: the CUDA provider and
TensorRT keep ``OrtDecoder``/``TrtDecoder``'s one sequence (see the README's batching section).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .arena import HostArena
from .base import ContextError, KVSpec
from .ort import OrtDecoder

__all__ = ["SlotDecoder", "kv_slot_bytes"]


def kv_slot_bytes(kv: KVSpec, capacity: int) -> int:
    """Bytes of one slot's KV cache: every layer's key and value, ``capacity`` positions."""
    return 2 * kv.num_layers * kv.num_kv_heads * capacity * kv.head_dim * np.dtype(kv.dtype).itemsize


class SlotDecoder(OrtDecoder):
    """An :class:`OrtDecoder` whose arena holds ``slots`` sequences of up to ``capacity`` tokens each.

    Takes ``OrtDecoder``'s arguments (CPU only). The one-sequence methods (``prefill``, ``decode_one_token``,
    ...) are not available: sequences go through the slot methods (module docstring). ``session`` reuses an
    open ``InferenceSession`` (the pipeline's one-sequence decoder's: the weights are loaded once)."""

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, slots: int, session=None, **kw):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if kw.get("device", "cpu") != "cpu":
            raise ValueError("batched decoding (slots) runs on the CPU arena only")
        super().__init__(onnx_path, kv, capacity=capacity, session=session, **kw)
        T, H, D, C = 2 * kv.num_layers, kv.num_kv_heads, kv.head_dim, self.capacity
        self.slots = int(slots)
        self.arena = HostArena(T, H, D, C, self.dtype, slots=self.slots)
        rows = max(C, self.slots)                                          # one slot's prompt, or one row per slot
        self._scratch = np.zeros((T, H * rows * D), self.dtype)
        self._scratch_ptr = [int(self._scratch[j].ctypes.data) for j in range(T)]
        self.lengths = np.zeros(self.slots, np.int64)
        self._bmask = np.zeros(self.slots * (C + 1), np.int64)             # [B, Lb+1], B*(Lb+1) <= slots*(C+1)
        self._bpos = np.zeros((self.slots, 1), np.int64)
        self._blogits = np.zeros((self.slots, 1, self.vocab_size), self.dtype)
        self._bx = np.zeros((self.slots, 1, self.hidden_size), self.dtype)
        self.length = 0

    @classmethod
    def sharing(cls, dec: OrtDecoder, slots: int, capacity: int | None = None) -> "SlotDecoder":
        """A slot decoder on ``dec``'s open session (same graph, weights loaded once)."""
        if getattr(dec, "device", "cpu") != "cpu" or not hasattr(dec, "session"):
            raise ValueError("batched decoding needs the ONNX Runtime CPU decoder")
        return cls("", dec.kv, capacity=capacity or dec.capacity, slots=slots, session=dec.session,
                   names=dec.names, weights_bytes=dec.weights_bytes)

    @property
    def kv_bytes(self) -> int:
        return self.slots * kv_slot_bytes(self.kv, self.capacity)

    # -- the one-sequence interface is not this decoder's -----------------------------------------------------
    def _one(self, *_a, **_k):
        raise TypeError("a SlotDecoder runs sequences in slots: use prefill(slot, x), extend(slot, x), decode(x)")

    decode_one_token = kv_read = kv_write = truncate = cache = _one

    def reset(self, length: int = 0) -> None:
        """Free every slot."""
        if length:
            raise ValueError("a SlotDecoder resets to empty slots only")
        self.lengths[:] = 0
        self.arena.bucket = 0

    # -- slots ---------------------------------------------------------------------------------------------
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

    def _bind(self, x: np.ndarray, past: int, lb: int, mask: np.ndarray, pos: np.ndarray, out: Sequence[int],
              logits: np.ndarray) -> None:
        """Bind one call: ``x`` [B, S, D], past [B, KVH, lb, Hd] at byte offset ``past`` of every slab."""
        io, dt, n = self._io, self.dtype, self.names
        B, S = x.shape[0], x.shape[1]
        H, D = self.kv.num_kv_heads, self.kv.head_dim
        io.bind_input(n.inputs_embeds, "cpu", 0, dt, [B, S, self.hidden_size], x.ctypes.data)
        io.bind_input(n.attention_mask, "cpu", 0, np.int64, list(mask.shape), mask.ctypes.data)
        io.bind_input(n.position_ids, "cpu", 0, np.int64, list(pos.shape), pos.ctypes.data)
        for j, (p, o) in enumerate(self._names):
            io.bind_input(p, "cpu", 0, dt, [B, H, lb, D], self.arena.ptr(j) + past)
            io.bind_output(o, "cpu", 0, dt, [B, H, S, D], out[j])
        io.bind_output(n.logits, "cpu", 0, dt, [B, 1, self.vocab_size], logits.ctypes.data)
        self.session.run_with_iobinding(io)

    def prefill(self, slot: int, inputs_embeds) -> np.ndarray:
        """Run a prompt [S, D] alone into the empty ``slot``; returns the last logits [V] (a copy)."""
        s, x = self._check_slot(slot), self._embeds(inputs_embeds)
        S = x.shape[1]
        if S > self.capacity:
            raise ContextError(f"{S} new tokens exceed the cache capacity {self.capacity}")
        self.lengths[s] = 0
        mask = np.ones((1, S), np.int64)
        pos = np.arange(S, dtype=np.int64)[None]
        logits = np.zeros((1, 1, self.vocab_size), self.dtype)
        self._bind(x, 0, 0, mask, pos, self._scratch_ptr, logits)
        self._place(s, 0, S)
        return logits[0, 0]

    def extend(self, slot: int, inputs_embeds) -> np.ndarray:
        """Append S tokens [S, D] to ``slot``'s sequence (B = 1: chunked prefill); returns the last logits [V]."""
        s, x = self._check_slot(slot), self._embeds(inputs_embeds)
        P, S = int(self.lengths[s]), x.shape[1]
        if P == 0:
            return self.prefill(s, x)
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        a = self.arena
        Lb = a.bucket
        mask = np.zeros((1, Lb + S), np.int64)
        a.mask(mask[0], P, S)
        pos = np.arange(P, P + S, dtype=np.int64)[None]
        logits = np.zeros((1, 1, self.vocab_size), self.dtype)
        block = s * a.kvh * Lb * a.row                                      # slot s's [KVH, Lb, Hd], dense
        self._bind(x, block, Lb, mask, pos, self._scratch_ptr, logits)
        self._place(s, P, S)
        return logits[0, 0]

    def _place(self, s: int, at: int, S: int) -> None:
        """Copy S new rows of one slot from the scratch ([tensors, KVH, S, Hd]) to rows at..at+S-1."""
        a = self.arena
        a.ensure(int(self.lengths.max()), at + S)
        new = self._scratch[:, : a.kvh * S * a.hd].reshape(a.tensors, a.kvh, S, a.hd)
        a.view()[:, s * a.kvh:(s + 1) * a.kvh, at:at + S] = new
        a.copied += new.nbytes
        self.lengths[s] = at + S

    def decode(self, token_embeds) -> np.ndarray:
        """One token [B, D] for each of slots 0..B-1 (all holding a sequence) in one graph call; returns the
        next logits [B, V] (a view, valid until the next call)."""
        e = np.asarray(token_embeds)
        B = e.shape[0] if e.ndim == 2 else 0
        if not 1 <= B <= self.slots or e.shape[-1] != self.hidden_size:
            raise ValueError(f"token embeddings must be [B, {self.hidden_size}] with 1 <= B <= {self.slots}, "
                             f"got {list(e.shape)}")
        P = self.lengths[:B]
        if P.min() < 1:
            raise ValueError(f"slot {int(np.argmin(P))} holds no sequence")
        if P.max() + 1 > self.capacity:
            raise ContextError(f"slot {int(np.argmax(P))}: {int(P.max())} cached + 1 new token exceed the cache "
                               f"capacity {self.capacity}")
        a = self.arena
        Lb = a.bucket
        x = self._bx[:B]
        x[:, 0] = e
        cols = np.arange(Lb + 1)
        mask = self._bmask[: B * (Lb + 1)].reshape(B, Lb + 1)
        mask[:] = (cols[None] < P[:, None]) | (cols[None] == Lb)
        pos = self._bpos[:B]
        pos[:, 0] = P
        self._bind(x, 0, Lb, mask, pos, self._scratch_ptr, self._blogits)
        a.ensure(int(self.lengths.max()), int(P.max()) + 1)
        new = self._scratch[:, : B * a.kvh * a.hd].reshape(a.tensors, B * a.kvh, a.hd)   # [T, B*KVH, Hd]
        a.view()[:, np.arange(B * a.kvh), np.repeat(P, a.kvh)] = new
        a.copied += new.nbytes
        self.lengths[:B] += 1
        return self._blogits[:B, 0]

    def move(self, src: int, dst: int) -> None:
        """Move ``src``'s sequence to the free slot ``dst`` (``src`` is free afterwards)."""
        src, dst = self._check_slot(src), self._check_slot(dst)
        n, v, h = int(self.lengths[src]), self.arena.view(), self.arena.kvh
        if src != dst:
            v[:, dst * h:(dst + 1) * h, :n] = v[:, src * h:(src + 1) * h, :n]
            self.arena.copied += v[:, :h, :n].nbytes
            self.lengths[dst], self.lengths[src] = n, 0

    def free(self, slot: int) -> None:
        self.lengths[self._check_slot(slot)] = 0
        if not self.lengths.any():
            self.arena.bucket = 0

    def slot_read(self, slot: int) -> list[np.ndarray]:
        """Host copies of ``slot``'s cached rows, [1, KVH, len, Hd] each, ``KVSpec.names()`` order (tests)."""
        s, h = self._check_slot(slot), self.arena.kvh
        n, v = int(self.lengths[s]), self.arena.view()
        return [v[j, None, s * h:(s + 1) * h, :n].copy() for j in range(self.arena.tensors)]
