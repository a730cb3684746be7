"""ONNX Runtime decoders for the KV form ``"shared"`` (the cpu target's fused graph, ``export/fused_decoder.py``).

The graph's ``GroupQueryAttention`` nodes take ``past_key``/``past_value`` [B, KVH, C, Hd] and return
``present_key``/``present_value`` of the same shape; bound to the *same* memory, ONNX Runtime writes the call's
new rows in place (its CPU kernel compares the two pointers: ``past_present_share_buffer``, and skips the copy of
the past) at rows ``seqlens_k[b]+1-S .. seqlens_k[b]`` of sequence b, and attends over rows 0..seqlens_k[b].
So the buffer *is* the one KV arena: no scratch, no copy of each step's rows, no bucket repacks, and no mask
(rows beyond a sequence's length are never read; ``truncate`` only lowers the length).

What the graph is given (GroupQueryAttention's contract, ``group_query_attention_helper.h`` ``CheckInputs`` in
ONNX Runtime 1.32, checked by the export's parity gate and ``tests/test_fused_decoder.py``):

* ``seqlens_k`` [B] int32 = each sequence's total length after this call **minus one**;
  ``total_sequence_length`` (scalar int32) = the largest total length in the batch.
* The phase is chosen from the shapes: S == total is a first prompt (the past is ignored; a prefill), S == 1
  otherwise is token generation (B may be > 1, each row with its own length), and S > 1 with S != total is a
  "subsequent prompt" (chat extension, chunked prefill), which the kernel allows for B = 1 only.
* Rotary positions are derived from ``seqlens_k`` (first prompt: 0..S-1; otherwise seqlens_k+1-S+i), so the
  graph needs no position input: a sequence's positions are its row numbers, as in this runtime's arena.

:class:`SharedKVDecoder` is the one-sequence decoder (``OrtDecoder``'s interface); :class:`SharedSlotDecoder`
runs ``slots`` sequences in one buffer [slots, KVH, C, Hd] per layer key/value (``SlotOps``' interface, what the
scheduler drives): a decode step binds slots 0..B-1 (dense at the buffer's start), a prefill or extension binds
one slot's block. CPU only: the CUDA provider has GroupQueryAttention kernels too, but no GPU was available to
test a CUDA bundle of this form, so ``device="cuda"`` is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..graph_spec import KVSpec, SharedDecoderNames
from .arena import check_kv_arrays
from .base import BackendError, ContextError, truncation
from .ort import decoder_files
from .slots import decode_step

__all__ = ["SharedKVDecoder", "SharedSlotDecoder"]


class SharedKVDecoder:
    """One sequence on a ``"shared"``-form decoder graph, the KV cache in one host buffer bound once.

    Arguments as ``OrtDecoder``'s: ``capacity`` (most tokens cached), ``threads``/``session_options``,
    ``names`` (the manifest's ``graphs.decoder.names``), ``session`` (an open session to reuse), ``slots``
    (sequences the buffer holds: 1 here, more for :class:`SharedSlotDecoder`)."""

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, session_options=None,
                 threads: int | None = None, device: str = "cpu", weights_bytes: int | None = None,
                 names: SharedDecoderNames = SharedDecoderNames(), session=None, slots: int = 1):
        import onnxruntime as ort

        from .ort import make_options

        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if device != "cpu":
            raise BackendError("a decoder of KV form 'shared' (the cpu target's fused graph) runs on the CPU only: "
                               "its CUDA path is untested here; export with --target jetson or datacenter for a GPU")
        so = session_options if session_options is not None else make_options(threads)
        self.session = session or ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.kv, self.names, self.capacity, self.device = kv, names, int(capacity), device
        self.dtype = np.dtype(kv.dtype)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        self._names = kv.names()
        absent = [n for n in (*names.inputs, *(p for p, _ in self._names)) if n not in inputs] + \
                 [n for n in (*names.outputs, *(o for _, o in self._names)) if n not in outputs]
        if absent:
            raise ValueError(f"decoder graph lacks the tensors {', '.join(absent[:4])} the manifest names")
        self.hidden_size = int(inputs[names.inputs_embeds].shape[-1])
        self.vocab_size = int(outputs[names.logits].shape[-1])
        self.slots = int(slots)
        H, D = kv.num_kv_heads, kv.head_dim
        # the arena: [2L, slots, KVH, C, Hd], zeros (pages resident only once written); KVSpec.names() order
        self.data = np.zeros((2 * kv.num_layers, self.slots, H, self.capacity, D), self.dtype)
        self._slot_bytes = H * self.capacity * D * self.dtype.itemsize
        self._seqlens = np.zeros(self.slots, np.int32)                     # seqlens_k [B]
        self._total = np.zeros((), np.int32)                                # total_sequence_length []
        self._logits = np.zeros((self.slots, 1, self.vocab_size), self.dtype)
        self._token = np.zeros((1, 1, self.hidden_size), self.dtype)
        self._io = self.session.io_binding()
        self._bound = None                                                  # (first slot, B) of the KV bindings
        self.weights_bytes = weights_bytes
        self.length = 0

    @classmethod
    def from_manifest(cls, root: str | Path, graph, *, capacity: int | None = None,
                      context_length: int | None = None, **kw) -> "SharedKVDecoder":
        g, path, cap, size = decoder_files(root, graph, capacity, context_length)
        return cls(path, g.kv, capacity=cap, weights_bytes=size, names=g.names, **kw)

    @property
    def kv_bytes(self) -> int:
        return self.data.nbytes

    # -- one graph call ------------------------------------------------------------------------------------
    def _call(self, x: np.ndarray, first: int, totals: np.ndarray) -> np.ndarray:
        """Run ``x`` [B, S, D] for slots first..first+B-1 whose total lengths after the call are ``totals`` [B];
        returns the logits [B, V] (a view, valid until the next call)."""
        B, S = x.shape[0], x.shape[1]
        io, n, dt = self._io, self.names, self.dtype
        self._seqlens[:B] = totals - 1
        self._total[...] = int(totals.max())
        io.bind_input(n.inputs_embeds, "cpu", 0, dt, [B, S, self.hidden_size], x.ctypes.data)
        io.bind_input(n.seqlens_k, "cpu", 0, np.int32, [B], self._seqlens.ctypes.data)
        io.bind_input(n.total_sequence_length, "cpu", 0, np.int32, [], self._total.ctypes.data)
        if self._bound != (first, B):                   # same addresses and shapes as the last call: they hold
            shape = [B, self.kv.num_kv_heads, self.capacity, self.kv.head_dim]
            for j, (past, present) in enumerate(self._names):
                ptr = int(self.data[j].ctypes.data) + first * self._slot_bytes
                io.bind_input(past, "cpu", 0, dt, shape, ptr)              # [B, KVH, C, Hd]
                io.bind_output(present, "cpu", 0, dt, shape, ptr)          # the same buffer: written in place
            io.bind_output(n.logits, "cpu", 0, dt, [B, 1, self.vocab_size], self._logits.ctypes.data)
            self._bound = (first, B)
        self.session.run_with_iobinding(io)
        return self._logits[:B, 0]

    def _embeds(self, x) -> np.ndarray:
        x = np.asarray(x)
        x = np.ascontiguousarray(x.reshape(1, -1, x.shape[-1]), dtype=self.dtype)    # [1, S, D]
        if x.shape[-1] != self.hidden_size or x.shape[1] < 1:
            raise ValueError(f"embeddings must be [S, {self.hidden_size}], got {list(np.shape(x))[1:]}")
        return x

    def _append(self, slot: int, P: int, x: np.ndarray) -> np.ndarray:
        """``x`` [1, S, D] after the P rows cached in ``slot``; returns the last logits [V] (a view)."""
        S = x.shape[1]
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        return self._call(x, slot, np.asarray([P + S]))[0]

    # -- the one-sequence interface (generate.py, chat.py) -------------------------------------------------------
    def prefill(self, inputs_embeds) -> np.ndarray:
        """Run the prompt [S, D] on an empty cache; returns the last logits [V] (a view)."""
        x = self._embeds(inputs_embeds)
        self.length = 0
        logits = self._append(0, 0, x)
        self.length = x.shape[1]
        return logits

    def extend(self, inputs_embeds) -> np.ndarray:
        """Append S tokens [S, D] to what is cached; returns the last logits [V]."""
        x = self._embeds(inputs_embeds)
        logits = self._append(0, self.length, x)
        self.length += x.shape[1]
        return logits

    def decode_one_token(self, token_embeds) -> np.ndarray:
        """Append one token's embedding [D]; returns the next logits [V] (a view)."""
        self._token.reshape(-1)[:] = np.asarray(token_embeds).reshape(-1)
        logits = self._append(0, self.length, self._token)
        self.length += 1
        return logits

    def reset(self, length: int = 0) -> None:
        """Forget the cache. ``length > 0`` pretends that many (stale) positions are cached: benchmarks only."""
        if not 0 <= length <= self.capacity:
            raise ContextError(f"length {length} outside the cache capacity {self.capacity}")
        self.length = int(length)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions: O(1), rows beyond are never read again."""
        n = truncation(self.length, length)
        if n is not None:
            self.length = n

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the cached key and value of ``layer``: [1, KVH, length, Hd] each."""
        n = self.length
        k, v = self.kv.layer_tensors(layer)                         # the KV order (graph_spec.KVSpec)
        return self.data[k, :1, :, :n], self.data[v, :1, :, :n]

    def kv_read(self, length: int) -> list[np.ndarray]:
        """Host copies of the first ``length`` cached positions, [1, KVH, length, Hd] each, ``KVSpec.names()``
        order."""
        if not 0 <= int(length) <= self.length:
            raise ContextError(f"cannot read {length} positions of {self.length} cached")
        return self._read(0, int(length))

    def kv_write(self, arrays: Sequence[np.ndarray]) -> None:
        """Replace the cache by ``arrays`` (as :meth:`kv_read` gives them)."""
        self.length = self._load(0, arrays)

    def _read(self, slot: int, n: int) -> list[np.ndarray]:
        return [self.data[j, slot:slot + 1, :, :n].copy() for j in range(self.data.shape[0])]

    def _load(self, slot: int, arrays: Sequence[np.ndarray]) -> int:
        H, D = self.kv.num_kv_heads, self.kv.head_dim
        n = check_kv_arrays(arrays, self.data.shape[0], H, D, self.dtype, self.capacity)
        for j, a in enumerate(arrays):
            self.data[j, slot, :, :n] = np.asarray(a)[0]
        return n

    def close(self) -> None:
        """Nothing to free beyond numpy's buffer (the interface ``OrtDecoder`` has)."""


class SharedSlotDecoder(SharedKVDecoder):
    """``slots`` sequences in one ``"shared"``-form buffer: ``SlotOps``' interface (``prefill(slot, x)``,
    ``extend(slot, x)``, ``decode(embeds [B, D])`` for slots 0..B-1, ``move``, ``free``, ``slot_read``,
    ``slot_write``). Each sequence's length goes to the graph as its ``seqlens_k`` entry: a decode step of B
    sequences of different lengths is one call, and each new row lands in its own slot at its own length."""

    prefill_max: int | None = None

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, slots: int, **kw):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        super().__init__(onnx_path, kv, capacity=capacity, slots=slots, **kw)
        self.lengths = np.zeros(self.slots, np.int64)
        self.extend_max = self.capacity
        self.decode_copies = 0                      # copies of the decode steps' new rows: none in this form

    @classmethod
    def sharing(cls, dec: SharedKVDecoder, slots: int, capacity: int | None = None) -> "SharedSlotDecoder":
        """A slot decoder on ``dec``'s open session (the weights loaded once)."""
        return cls("", dec.kv, capacity=capacity or dec.capacity, slots=slots, session=dec.session,
                   names=dec.names, weights_bytes=dec.weights_bytes)

    def _one(self, *_a, **_k):
        raise TypeError("a slot decoder runs sequences in slots: use prefill(slot, x), extend(slot, x), decode(x)")

    decode_one_token = kv_read = kv_write = truncate = cache = _one

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        return int(slot)

    def reset(self, length: int = 0) -> None:
        """Free every slot."""
        if length:
            raise ValueError("a slot decoder resets to empty slots only")
        self.lengths[:] = 0

    def prefill(self, slot: int, inputs_embeds) -> np.ndarray:
        """Run a prompt [S, D] into the empty ``slot``; returns the last logits [V] (a copy)."""
        s, x = self._check_slot(slot), self._embeds(inputs_embeds)
        if x.shape[1] > self.capacity:
            raise ContextError(f"{x.shape[1]} new tokens exceed the cache capacity {self.capacity}")
        self.lengths[s] = 0
        logits = self._append(s, 0, x).copy()
        self.lengths[s] = x.shape[1]
        return logits

    def extend(self, slot: int, inputs_embeds) -> np.ndarray:
        """Append S tokens [S, D] to ``slot``'s sequence; returns the last logits [V] (a copy)."""
        s, x = self._check_slot(slot), self._embeds(inputs_embeds)
        P = int(self.lengths[s])
        logits = self._append(s, P, x).copy()
        self.lengths[s] = P + x.shape[1]
        return logits

    def decode(self, token_embeds) -> np.ndarray:
        """One token [B, D] for each of slots 0..B-1 (all holding a sequence) in one graph call; returns the
        next logits [B, V] (a view, valid until the next call)."""
        e, P = decode_step(token_embeds, self.slots, self.hidden_size, self.lengths, self.capacity)
        B = len(P)
        x = np.ascontiguousarray(e.reshape(B, 1, -1), dtype=self.dtype)
        logits = self._call(x, 0, P + 1)
        self.lengths[:B] += 1
        return logits

    def move(self, src: int, dst: int) -> None:
        """Move ``src``'s sequence to the free slot ``dst`` (``src`` is free afterwards)."""
        src, dst = self._check_slot(src), self._check_slot(dst)
        if src != dst:
            n = int(self.lengths[src])
            self.data[:, dst, :, :n] = self.data[:, src, :, :n]
            self.lengths[dst], self.lengths[src] = n, 0

    def free(self, slot: int) -> None:
        self.lengths[self._check_slot(slot)] = 0

    def slot_write(self, slot: int, arrays: Sequence[np.ndarray]) -> None:
        """Fill ``slot`` with a cached prefix ([1, KVH, n, Hd] each, ``KVSpec.names()`` order)."""
        s = self._check_slot(slot)
        self.lengths[s] = 0
        self.lengths[s] = self._load(s, arrays)

    def slot_read(self, slot: int) -> list[np.ndarray]:
        """Host copies of ``slot``'s cached rows, [1, KVH, len, Hd] each."""
        s = self._check_slot(slot)
        return self._read(s, int(self.lengths[s]))
