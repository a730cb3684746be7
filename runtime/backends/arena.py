"""One KV arena for a decoder whose graph returns only the call's new keys and values (``export/decoder.py``).

The graph takes ``past`` [B, KVH, Lb, Hd] per layer (key, value) and returns ``new`` [B, KVH, S, Hd]. A backend
keeps one preallocated arena per layer key/value and binds a prefix of it as ``past``; the new rows are
written in place. Both ONNX Runtime's IOBinding and TensorRT's ``set_tensor_address`` take a dense tensor
at one address, and a [1, KVH, P, Hd] prefix of a [1, KVH, C, Hd] buffer is not dense (each head's rows are
C apart). So the arena is kept *packed for a bucket length* Lb >= P: tensor j is the first
slots*KVH*Lb*Hd elements of its slab, viewed as [slots, KVH, Lb, Hd], rows P..Lb-1 of each head unused.

* A call binds ``past`` = [1, KVH, Lb, Hd] at the slab's start and ``attention_mask`` = 1 on rows 0..P-1,
  0 on rows P..Lb-1 (the graph's softmax gives them weight exactly 0), 1 on the S new positions.
* The new rows land in a small scratch [2L][KVH, S, Hd] and are copied to rows P..P+S-1 of every head:
  2L*KVH*S*Hd elements per call (one numpy assignment on the host, one ``cudaMemcpy2DAsync`` per layer
  key/value on a GPU). A prefill (P = 0) sets Lb = S and the graph writes straight into the arena.
* When P+S exceeds Lb, the arena is repacked in place to Lb' = :func:`grow` (at least double, at most the
  capacity): each head's P valid rows move from h*Lb to h*Lb', last head first, so no head is overwritten
  before it moves. Doubling makes that copy amortised O(1) rows per generated token (a geometric series:
  fewer than 2 moves per row over a whole generation), against the P rows per step that a
  ``present = concat(past, new)`` graph rewrites.
* Costs: attention reads Lb <= 2P rows per head (the masked rows cost reads, not accuracy: their weight is
  0); memory is one arena (slots*2L*KVH*C*Hd) plus the scratch (2L*KVH*E*Hd for E = the longest one-call
  extension, :data:`EXTEND_MAX`). The alternative, binding the whole capacity with a mask, never repacks
  but reads all C rows every step (C/P times the valid rows: 8x at P = 512 of C = 4096, where a bucket
  reads at most 2x); ``scripts/kv_costs.py`` times all three (bucket P+1, 2P and C; BENCHMARKS.md).
* ``truncate`` is O(1): rows beyond the new length become masked-out bucket rows.

Continuous batching (``slots.py``, issue 14): ``slots`` sequences share one bucket, [slots, KVH, Lb, Hd];
each slot's valid length is its own (its attention_mask row has zeros from its length to Lb) and its new
rows go to its own row offset: :meth:`place` (a prompt's rows into one slot), :meth:`scatter` (one new row
per slot, each at its own length), :meth:`move_slot` and :meth:`read_slot`. ``align`` rounds every bucket
up to a multiple of that many rows, so that each slot's [KVH, Lb, Hd] block starts 256-byte aligned (what
TensorRT's ``set_tensor_address`` requires of a slot's past bound at its block, ``TrtSlotDecoder.extend``);
the arena then holds ``capacity`` rounded up to it.

:class:`HostArena` (numpy, ONNX Runtime on the CPU) and :class:`DeviceArena` (cuda-python device memory:
ONNX Runtime's CUDA provider and TensorRT) implement the same moves. Standard library + numpy only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import ContextError

__all__ = ["MIN_BUCKET", "EXTEND_MAX", "grow", "HostArena", "DeviceArena", "check_kv_arrays"]

MIN_BUCKET = 16                 # smallest bucket after a prefill's exact one (a few repacks fewer on short prompts)
EXTEND_MAX = 512                # most new tokens one extend call takes: the scratch's rows (longer ones are chunked)


def grow(bucket: int, need: int, capacity: int) -> int:
    """The bucket length that holds ``need`` rows: ``bucket`` if it does, else at least double, at most the
    capacity."""
    if need > capacity:
        raise ContextError(f"{need} positions exceed the cache capacity {capacity}")
    return bucket if need <= bucket else min(capacity, max(need, 2 * bucket, MIN_BUCKET))


def check_kv_arrays(arrays: Sequence, tensors: int, kvh: int, hd: int, dtype: np.dtype, capacity: int) -> int:
    """The length of ``kv_write``'s arrays ([1, KVH, length, Hd] each, ``tensors`` of them, the cache dtype);
    ValueError on a shape/dtype mismatch, ContextError beyond the capacity."""
    if len(arrays) != tensors:
        raise ValueError(f"expected {tensors} KV arrays (the KV order of graph_spec.KVSpec), got {len(arrays)}")
    shapes = {tuple(np.shape(a)) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"KV arrays have different shapes {sorted(shapes)}")
    (shape,) = shapes
    if len(shape) != 4 or shape[0] != 1 or shape[1] != kvh or shape[3] != hd:
        raise ValueError(f"KV arrays must be [1, {kvh}, length, {hd}], got {list(shape)}")
    bad = sorted({str(np.asarray(a).dtype) for a in arrays} - {str(dtype)})
    if bad:
        raise ValueError(f"KV arrays must be {dtype}, got {', '.join(bad)}")
    if shape[2] > capacity:
        raise ContextError(f"{shape[2]} positions exceed the cache capacity {capacity}")
    return int(shape[2])


class _Arena:
    """Bookkeeping shared by both kinds: tensors (2L) x slots x KVH head blocks, ``bucket`` rows each."""

    def __init__(self, tensors: int, kv_heads: int, head_dim: int, capacity: int, dtype, slots: int = 1,
                 align: int = 1):
        if align < 1:
            raise ValueError(f"align must be at least 1 row, got {align}")
        capacity = -(-int(capacity) // align) * align                # whole aligned buckets
        self.tensors, self.kvh, self.hd, self.capacity, self.slots = tensors, kv_heads, head_dim, capacity, slots
        self.align = int(align)
        self.dtype = np.dtype(dtype)
        self.blocks = slots * kv_heads                               # head blocks per tensor
        self.row = head_dim * self.dtype.itemsize                   # bytes of one position of one head
        self.slab = self.blocks * capacity * head_dim               # elements per tensor
        self.bucket = 0
        self.copied = 0                                             # bytes moved by writes and repacks (benchmarks)

    def reset(self, length: int = 0) -> int:
        """Forget the cache; ``length > 0`` pretends that many (stale) rows are cached (benchmarks only), in a
        bucket that takes the next token without a repack. Returns ``length``."""
        if not 0 <= length <= self.capacity:
            raise ContextError(f"length {length} outside the cache capacity {self.capacity}")
        self.bucket = 0
        if length:
            self.ensure(0, min(self.capacity, length + 1))
        return int(length)

    def ensure(self, rows: int, need: int) -> None:
        """Make the bucket hold ``need`` rows, keeping the first ``rows`` of every head block."""
        new = grow(self.bucket, need, self.capacity)
        new = min(self.capacity, -(-new // self.align) * self.align)
        if new != self.bucket:
            if rows:
                self._repack(rows, self.bucket, new)
                self.copied += self.tensors * (self.blocks - 1) * rows * self.row
            self.bucket = new

    def mask(self, out: np.ndarray, length: int, seq: int) -> int:
        """Fill ``out`` with the attention mask of one call (``length`` valid rows, bucket, ``seq`` new);
        returns its length bucket + seq."""
        b = self.bucket
        out[:length], out[length:b], out[b:b + seq] = 1, 0, 1
        return b + seq


class HostArena(_Arena):
    """The arena in host memory: one [tensors, slab] numpy array (zeros: pages resident only once written)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.data = np.zeros((self.tensors, self.slab), self.dtype)

    def ptr(self, j: int) -> int:
        return int(self.data[j].ctypes.data)

    def view(self, bucket: int | None = None) -> np.ndarray:
        """[tensors, slots*KVH, bucket, Hd] view of the packed arena."""
        b = self.bucket if bucket is None else bucket
        return self.data[:, : self.blocks * b * self.hd].reshape(self.tensors, self.blocks, b, self.hd)

    def _repack(self, rows: int, old: int, new: int) -> None:
        src, dst = self.view(old), self.view(new)
        for h in range(self.blocks - 1, 0, -1):                     # last block first; block 0 stays put
            dst[:, h, :rows] = src[:, h, :rows]                     # numpy buffers an overlapping copy

    def write(self, at: int, new: np.ndarray) -> None:
        """Rows ``at..at+S-1`` of every head block <- ``new`` [tensors, slots*KVH, S, Hd]."""
        s = new.shape[2]
        self.view()[:, :, at:at + s] = new
        self.copied += new.nbytes

    # -- slots (slots.py) ----------------------------------------------------------------------------------
    def place(self, slot: int, at: int, new: np.ndarray) -> None:
        """Rows ``at..at+S-1`` of ``slot``'s head blocks <- ``new`` [tensors, KVH, S, Hd]."""
        h = self.kvh
        self.view()[:, slot * h:(slot + 1) * h, at:at + new.shape[2]] = new
        self.copied += new.nbytes

    def scatter(self, rows: np.ndarray, new: np.ndarray) -> None:
        """One new row for each of slots 0..B-1, at row ``rows[b]`` of slot b <- ``new`` [tensors, B*KVH, Hd]."""
        B = len(rows)
        self.view()[:, np.arange(B * self.kvh), np.repeat(rows, self.kvh)] = new
        self.copied += new.nbytes

    def move_slot(self, src: int, dst: int, rows: int) -> None:
        """Slot ``dst``'s first ``rows`` rows <- slot ``src``'s."""
        v, h = self.view(), self.kvh
        v[:, dst * h:(dst + 1) * h, :rows] = v[:, src * h:(src + 1) * h, :rows]
        self.copied += v[:, :h, :rows].nbytes

    def read_slot(self, slot: int, rows: int) -> list[np.ndarray]:
        """Host copies of ``slot``'s first ``rows`` rows, [1, KVH, rows, Hd] per tensor."""
        v, h = self.view(), self.kvh
        return [v[j, None, slot * h:(slot + 1) * h, :rows].copy() for j in range(self.tensors)]

    def read(self, length: int) -> list[np.ndarray]:
        v = self.view()
        return [v[j, :, :length].reshape(self.slots, self.kvh, length, self.hd).copy() for j in range(self.tensors)]

    def load(self, arrays: Sequence[np.ndarray]) -> None:
        n = arrays[0].shape[2]
        self.bucket = 0
        self.ensure(0, max(n, 1))
        v = self.view()
        for j, a in enumerate(arrays):
            v[j, :, :n] = np.asarray(a).reshape(self.blocks, n, self.hd)


class DeviceArena(_Arena):
    """The arena in device memory (one ``cudaMalloc`` block; slabs 256-byte aligned), moved with cuda-python
    copies on ``stream``. ``temp`` is one head block's rows of scratch for a repack whose source and
    destination overlap (a bucket capped at the capacity grows by less than double).

    The block is zeroed once: masked-out bucket rows get softmax weight 0, but 0 * Inf or a NaN from
    never-written memory would still poison the attention output (stale rows of earlier keys are finite)."""

    def __init__(self, cuda, stream, *args, **kw):
        from .cuda import round_up

        super().__init__(*args, **kw)
        self.cuda, self.stream = cuda, stream
        self.slab_bytes = round_up(self.slab * self.dtype.itemsize)
        self.base = cuda.malloc(self.tensors * self.slab_bytes)
        self.temp = cuda.malloc(self.capacity * self.row)
        self.nbytes = self.tensors * self.slab_bytes
        cuda.memset(self.base, 0, self.nbytes, stream)
        cuda.sync(stream)

    def ptr(self, j: int) -> int:
        return self.base + j * self.slab_bytes

    def _repack(self, rows: int, old: int, new: int) -> None:
        n = rows * self.row
        for j in range(self.tensors):
            base = self.ptr(j)
            for h in range(self.blocks - 1, 0, -1):
                src, dst = base + h * old * self.row, base + h * new * self.row
                if dst < src + n:                                   # overlapping: through the temp block
                    self.cuda.d2d(self.temp, src, n, self.stream)
                    src = self.temp
                self.cuda.d2d(dst, src, n, self.stream)

    def write_from(self, at: int, scratch: Sequence[int], seq: int) -> None:
        """Rows ``at..at+seq-1`` of every head block <- the device scratch of each tensor ([blocks, seq, Hd])."""
        w = seq * self.row
        for j, src in enumerate(scratch):
            self.cuda.copy2d(self.ptr(j) + at * self.row, self.bucket * self.row, src, w, w, self.blocks,
                             "cudaMemcpyDeviceToDevice", self.stream)
        self.copied += self.tensors * self.blocks * w

    # -- slots (slots.py) ----------------------------------------------------------------------------------
    def _slot_at(self, j: int, slot: int, row: int = 0) -> int:
        return self.ptr(j) + (slot * self.kvh * self.bucket + row) * self.row

    def place_from(self, slot: int, at: int, scratch: Sequence[int], seq: int) -> None:
        """Rows ``at..at+seq-1`` of ``slot``'s head blocks <- each tensor's device scratch [KVH, seq, Hd]:
        one ``cudaMemcpy2DAsync`` per tensor."""
        w = seq * self.row
        for j, src in enumerate(scratch):
            self.cuda.copy2d(self._slot_at(j, slot, at), self.bucket * self.row, src, w, w, self.kvh,
                             "cudaMemcpyDeviceToDevice", self.stream)
        self.copied += self.tensors * self.kvh * w

    def scatter_from(self, rows: np.ndarray, scratch: Sequence[int]) -> int:
        """One new row for each of slots 0..B-1, at row ``rows[b]`` of slot b <- each tensor's device scratch
        [B*KVH, Hd] (the graph's [B, KVH, 1, Hd]). Consecutive slots at the same row share one
        ``cudaMemcpy2DAsync`` per tensor (their head blocks are ``bucket`` rows apart, as the scratch's rows
        are one apart), so a step costs tensors x (runs of equal lengths) copies. Returns that copy count."""
        rows = [int(r) for r in rows]
        runs, b = [], 0
        while b < len(rows):
            e = b + 1
            while e < len(rows) and rows[e] == rows[b]:
                e += 1
            runs.append((b, e))
            b = e
        pitch = self.bucket * self.row
        for j, src in enumerate(scratch):
            for b, e in runs:
                self.cuda.copy2d(self._slot_at(j, b, rows[b]), pitch, src + b * self.kvh * self.row, self.row,
                                 self.row, (e - b) * self.kvh, "cudaMemcpyDeviceToDevice", self.stream)
        self.copied += self.tensors * len(rows) * self.kvh * self.row
        return self.tensors * len(runs)

    def move_slot(self, src: int, dst: int, rows: int) -> None:
        """Slot ``dst``'s first ``rows`` rows <- slot ``src``'s (distinct slots: the blocks do not overlap)."""
        if rows and src != dst:
            w, pitch = rows * self.row, self.bucket * self.row
            for j in range(self.tensors):
                self.cuda.copy2d(self._slot_at(j, dst), pitch, self._slot_at(j, src), pitch, w, self.kvh,
                                 "cudaMemcpyDeviceToDevice", self.stream)
            self.copied += self.tensors * self.kvh * w

    def _download(self, start, blocks: int, rows: int, host: np.ndarray) -> list[np.ndarray]:
        """Host copies [blocks, rows, Hd] of ``rows`` rows of ``blocks`` head blocks from ``start(j)`` of every
        tensor, staged through the pinned ``host`` buffer (one tensor at a time)."""
        out, w, n = [], rows * self.row, blocks * rows * self.hd
        for j in range(self.tensors):
            if w:
                self.cuda.copy2d(host, w, start(j), self.bucket * self.row, w, blocks, "cudaMemcpyDeviceToHost",
                                 self.stream)
                self.cuda.sync(self.stream)
            out.append(host.view(self.dtype)[:n].reshape(blocks, rows, self.hd).copy())
        return out

    def _upload(self, start, blocks: int, arrays: Sequence[np.ndarray], host: np.ndarray) -> None:
        """``arrays`` (``blocks`` head blocks of n rows each, per tensor) -> rows 0..n-1 from ``start(j)``."""
        n = arrays[0].shape[2]
        w = n * self.row
        for j, a in enumerate(arrays):
            if w:
                host.view(self.dtype)[: blocks * n * self.hd] = np.asarray(a).reshape(-1)
                self.cuda.copy2d(start(j), self.bucket * self.row, host, w, w, blocks, "cudaMemcpyHostToDevice",
                                 self.stream)
                self.cuda.sync(self.stream)                         # the staging buffer is reused

    def load_slot(self, slot: int, arrays: Sequence[np.ndarray], host: np.ndarray) -> None:
        """Slot ``slot``'s first rows <- host ``arrays`` ([1, KVH, n, Hd] per tensor), staged through the pinned
        ``host`` buffer."""
        self._upload(lambda j: self._slot_at(j, slot), self.kvh, arrays, host)
        self.copied += self.tensors * self.kvh * arrays[0].shape[2] * self.row

    def read_slot(self, slot: int, rows: int, host: np.ndarray) -> list[np.ndarray]:
        """Host copies of ``slot``'s first ``rows`` rows, [1, KVH, rows, Hd] per tensor (``host``: pinned)."""
        return [a[None] for a in self._download(lambda j: self._slot_at(j, slot), self.kvh, rows, host)]

    def read(self, length: int, host: np.ndarray) -> list[np.ndarray]:
        """Host copies of the first ``length`` rows; ``host`` is a pinned staging buffer of >= one tensor."""
        return [a.reshape(self.slots, self.kvh, length, self.hd)
                for a in self._download(self.ptr, self.blocks, length, host)]

    def load(self, arrays: Sequence[np.ndarray], host: np.ndarray) -> None:
        self.bucket = 0
        self.ensure(0, max(arrays[0].shape[2], 1))
        self._upload(self.ptr, self.blocks, arrays, host)
