"""ONNX Runtime: sessions for the vision+gate graph, and :class:`OrtDecoder` for the language model.

Supported: CPU always; the CUDA execution provider when onnxruntime-gpu has it (the KV arena then lives in
device memory moved with cuda-python, as for TensorRT). Threads: an explicit ``threads`` argument, else
``SAFECLIP_THREADS``, else ONNX Runtime's default; the vision session and the decoder session both honour
it (:func:`make_options`).

KV cache of :class:`OrtDecoder`: one arena (``arena.py``, whose docstring gives the design and its costs).
The graph (``export/decoder.py``) reads ``past`` [1, KVH, Lb, Hd], a bucket-packed prefix of the arena with
the rows beyond the valid length masked out, and returns only the call's new rows [1, KVH, S, Hd]; a
prefill binds those outputs straight into the arena, later calls into a small scratch whose rows are then
copied to their place (2L*KVH*S*Hd elements per call instead of the whole cache). IOBinding binds every
input and output to preallocated memory: nothing is allocated per step, and ORT writes the logits into a
preallocated [1, 1, V] buffer. The 2L KV inputs and outputs keep their addresses and shapes while the
bucket, the call's length and the prefill/decode kind stay the same, so a decode step rebinds only its three
host inputs (embedding, mask, position; binding all 4L+3 took ~0.4 ms per step at TinyLlama shape). Host inputs
are rebound on every call because a GPU provider copies them at bind time (``_bind``). Bundles
whose decoder returns past + new (written before this design) are
refused when the manifest is read (``contract.py``): re-export them.

Which contrib kernels this ONNX Runtime build has is asked here (:func:`matmulnbits_available`): the
manifest refuses an int4/int8 ``MatMulNBits`` bundle at load on a build without it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..error_text import one_line
from .arena import EXTEND_MAX, DeviceArena, HostArena, check_kv_arrays
from ..graph_spec import DecoderNames, KVSpec
from .base import BackendError, ContextError, truncation

__all__ = ["BackendError", "OrtSession", "OrtDecoder", "available_providers", "make_session", "make_options",
           "matmulnbits_available"]


_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def make_options(threads: int | None = None, spin: bool | None = None):
    """ORT session options for every session of a bundle: all graph optimizations, ``threads`` intra-op
    threads (default ``SAFECLIP_THREADS``; unset or 0: ONNX Runtime's own default), and whether idle pool
    threads spin (``spin``, default ``SAFECLIP_SPIN``: ``0`` turns it off; unset: ONNX Runtime's default, on).

    Measured at TinyLlama shape (int4 decoder, 2 threads on 2 cores, alternated in one process): on a quiet
    machine spinning is a little faster (28.1-28.7 tokens/s against 25.8-27.4 without), but while another
    process keeps one core busy the spinning worker takes the core from the thread that has the work:
    ~10 tokens/s with spinning against ~18 without (BENCHMARKS.md). Turn it off where the decoder shares
    the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    n = threads or int(os.environ.get("SAFECLIP_THREADS", "0") or 0)
    if n:
        so.intra_op_num_threads = n
    if spin is None:
        env = os.environ.get("SAFECLIP_SPIN", "").strip()
        if env not in ("", "0", "1"):
            raise ValueError(f"SAFECLIP_SPIN must be 0 or 1, got '{env}'")
        spin = None if env == "" else env == "1"
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


def available_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


class OrtSession:
    """A thin wrapper that keeps the I/O metadata at hand."""

    def __init__(self, sess, provider: str):
        self.sess = sess
        self.provider = provider
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]
        self.output_shapes = {o.name: o.shape for o in sess.get_outputs()}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.sess.run(names, feeds)))


def make_session(path: str | Path, device: str = "cpu", threads: int | None = None) -> OrtSession:
    """Open an ONNX graph (its external ``.data`` beside it) with the providers for ``device``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from e
    wanted = _PROVIDERS.get(device)
    if wanted is None:
        raise BackendError(f"unknown onnxruntime device '{device}' (supported: {', '.join(_PROVIDERS)})")
    have = set(ort.get_available_providers())
    if wanted[0] not in have:
        raise BackendError(f"{wanted[0]} is not available in this onnxruntime (have: {', '.join(sorted(have))})")
    so = make_options(threads)
    try:
        sess = ort.InferenceSession(str(path), so, providers=[p for p in wanted if p in have])
    except Exception as e:
        raise BackendError(f"cannot load {Path(path).name}: {one_line(e)}") from None
    return OrtSession(sess, wanted[0])


_MATMULNBITS: list[bool] = []


def matmulnbits_available() -> bool:
    """Whether this ONNX Runtime build has a ``com.microsoft.MatMulNBits`` kernel (asked once per process;
    minimal and custom builds can leave contrib operators out)."""
    if not _MATMULNBITS:
        _MATMULNBITS.append(_try_matmulnbits())
    return _MATMULNBITS[0]


def _try_matmulnbits() -> bool:
    """ONNX Runtime's registered kernels (``get_all_opkernel_def``: every kernel of every provider compiled
    into this build) include a ``com.microsoft`` MatMulNBits."""
    try:   # ONNX Runtime lists its registered kernels only through its binding module
        from onnxruntime.capi import _pybind_state as C
        kernels = C.get_all_opkernel_def()
    except (ImportError, AttributeError, RuntimeError):   # no such API in this build: cannot tell, so refuse
        return False
    return any(k.op_name == "MatMulNBits" and k.domain == "com.microsoft" for k in kernels)


# ---------------------------------------------------------------------------------------------------------
def decoder_files(root: str | Path, graph, capacity: int | None, context_length: int | None):
    """(``DecoderGraph``, graph path, KV capacity, weight bytes on disk) of a bundle's ``graphs.decoder`` entry
    (a ``DecoderGraph`` or its JSON): what every ONNX Runtime decoder opens; the capacity defaults to the
    model's context length and may not exceed it (``ContextError``)."""
    from ..contract import DecoderGraph

    g = graph if isinstance(graph, DecoderGraph) else DecoderGraph.from_json(graph)
    root = Path(root)
    cap = capacity or context_length
    if cap is None:
        raise ValueError("give capacity or the model's context_length")
    if context_length is not None and cap > context_length:
        raise ContextError(f"capacity {cap} exceeds the model's context length {context_length}")
    return g, root / g.file, cap, sum(os.path.getsize(root / f) for f in g.files)


class OrtDecoder:
    """ONNX Runtime decoder session with one preallocated, I/O-bound KV arena (module docstring, ``arena.py``).

    ``capacity`` is the most tokens the cache holds (prompt + generated); at most the model's context
    length. ``device="cuda"`` puts the arena in GPU memory (needs onnxruntime-gpu with the CUDA provider and
    cuda-python). ``session_options`` (default: :func:`make_options` of ``threads``) configure the session.
    ``names`` are the graph's tensor names besides the KV cache (the manifest's ``graphs.decoder.names``).
    ``extend_max`` is the most tokens one call appends to a non-empty cache (longer extensions are chunked).
    ``session``: an open ``InferenceSession`` of the same graph to reuse (``slots.SlotDecoder.sharing``).
    """

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, providers: Sequence | None = None,
                 session_options=None, threads: int | None = None, device: str = "cpu",
                 weights_bytes: int | None = None, names: DecoderNames = DecoderNames(),
                 extend_max: int = EXTEND_MAX, cuda=None, session=None):
        import onnxruntime as ort

        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device '{device}' (supported: cpu, cuda)")
        providers = list(providers or (["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]))
        so = session_options if session_options is not None else make_options(threads)
        self.session = session or ort.InferenceSession(str(onnx_path), so, providers=providers)
        self.kv, self.names, self.capacity, self.device = kv, names, int(capacity), device
        self.dtype = np.dtype(kv.dtype)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        absent = [n for n in names.inputs if n not in inputs] + [n for n in names.outputs if n not in outputs]
        if absent:
            raise ValueError(f"decoder graph lacks the tensors {', '.join(absent)} the manifest names")
        self.hidden_size = int(inputs[names.inputs_embeds].shape[-1])
        self.vocab_size = int(outputs[names.logits].shape[-1])
        L, H, D = kv.num_layers, kv.num_kv_heads, kv.head_dim
        self._names = kv.names()
        missing = [p for p, _ in self._names if p not in inputs] + [o for _, o in self._names if o not in outputs]
        if missing:
            raise ValueError(f"decoder graph lacks the KV tensors {', '.join(missing[:4])}")
        self.extend_max = max(1, min(int(extend_max), self.capacity))
        if device == "cuda":
            from .cuda import CudaRuntime

            self.cuda = cuda or CudaRuntime()
            self._stream = self.cuda.stream()
        self._alloc_kv(2 * L, H, D)
        self._mask = np.ones((1, 2 * self.capacity + 1), np.int64)         # attention_mask [1, Lb+S]
        self._pos = np.arange(self.capacity, dtype=np.int64)[None]          # position_ids [1, S] = a slice
        self._logits = np.zeros((1, 1, self.vocab_size), self.dtype)       # logits [1, 1, V]
        self._token = np.zeros((1, 1, self.hidden_size), self.dtype)       # one token's embedding [1, 1, D]
        self._io = self.session.io_binding()
        self._io.bind_output(names.logits, "cpu", 0, self.dtype, list(self._logits.shape), self._logits.ctypes.data)
        self._bound = None                            # (bucket, S, prefill) of the KV bindings
        self.weights_bytes = weights_bytes
        self.length = 0

    def _alloc_kv(self, T: int, H: int, D: int, slots: int = 1, rows: int | None = None) -> None:
        """The arena (``slots`` sequences of ``capacity`` tokens) and the scratch for the new rows of one call
        ([2L][KVH, rows, Hd]; default ``extend_max`` rows), on the host or the device."""
        E = rows or self.extend_max
        if self.device == "cpu":
            self.arena = HostArena(T, H, D, self.capacity, self.dtype, slots=slots)
            self._scratch = np.zeros((T, H * E * D), self.dtype)            # new rows [2L][KVH, S, Hd], S <= E
            self._scratch_ptr = [int(self._scratch[j].ctypes.data) for j in range(T)]
        else:
            from .cuda import round_up

            self.arena = DeviceArena(self.cuda, self._stream, T, H, D, self.capacity, self.dtype, slots=slots)
            slab = round_up(H * E * D * self.dtype.itemsize)
            base = self.cuda.malloc(T * slab)
            self._scratch_ptr = [base + j * slab for j in range(T)]
            self._host = self.cuda.host_array(self.arena.slab, self.dtype)   # pinned: kv_read / kv_write

    @classmethod
    def from_manifest(cls, root: str | Path, graph, *, capacity: int | None = None,
                      context_length: int | None = None, **kw) -> "OrtDecoder":
        """From a bundle folder and its ``graphs.decoder`` entry (a ``DecoderGraph``, or its JSON);
        capacity defaults to the context length."""
        g, path, cap, size = decoder_files(root, graph, capacity, context_length)
        return cls(path, g.kv, capacity=cap, weights_bytes=size, names=g.names, **kw)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache memory: the one arena (its scratch is 1/C-th per extension row)."""
        return self.arena.tensors * self.arena.slab * self.dtype.itemsize

    def reset(self, length: int = 0) -> None:
        """Forget the cache. ``length > 0`` pretends that many (stale) positions are cached: benchmarks only."""
        self.length = self.arena.reset(length)

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the cached key and value of ``layer``: [1, KVH, length, Hd] each (CPU arena only)."""
        if self.device != "cpu":
            raise ValueError("cache views need the CPU arena (use kv_read)")
        v, n = self.arena.view(), self.length
        k, val = self.kv.layer_tensors(layer)                       # the KV order (graph_spec.KVSpec)
        return v[k, None, :, :n], v[val, None, :, :n]

    def kv_read(self, length: int) -> list[np.ndarray]:
        """Host copies of the first ``length`` cached positions, [1, KVH, length, Hd] each, in the KV order
        (``graph_spec.KVSpec``: layer by layer, key then value)."""
        if not 0 <= int(length) <= self.length:
            raise ContextError(f"cannot read {length} positions of {self.length} cached")
        return self.arena.read(int(length)) if self.device == "cpu" else self.arena.read(int(length), self._host)

    def kv_write(self, arrays: Sequence[np.ndarray]) -> None:
        """Replace the cache by ``arrays`` (as :meth:`kv_read` gives them); afterwards ``length`` is theirs."""
        n = check_kv_arrays(arrays, 2 * self.kv.num_layers, self.kv.num_kv_heads, self.kv.head_dim, self.dtype,
                            self.capacity)
        if self.device == "cpu":
            self.arena.load(arrays)
        else:
            self.arena.load(arrays, self._host)
        self.length = n

    def _bind(self, x: np.ndarray) -> int:
        """Bind one call's inputs and outputs; ``x`` [1, S, D] must stay alive until the run. Returns S."""
        P, S = self.length, x.shape[1]
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        a, io, dt, dev, n = self.arena, self._io, self.dtype, self.device, self.names
        if P == 0:                                   # prefill: the new rows are the whole arena, packed for S
            a.bucket, Lb, out = 0, 0, [a.ptr(j) for j in range(a.tensors)]
        else:
            Lb, out = a.bucket, self._scratch_ptr
        m = a.mask(self._mask[0], P, S)
        # Host inputs are bound on every call, after their last edit: a GPU provider copies a host input to the
        # device when it is bound (onnxruntime IOBinding.cc, CopyOneInputAcrossDevices), so a mask bound once and
        # edited in place later would be read stale there (the CPU provider aliases it, which hid this).
        io.bind_input(n.inputs_embeds, "cpu", 0, dt, [1, S, self.hidden_size], x.ctypes.data)
        io.bind_input(n.position_ids, "cpu", 0, np.int64, [1, S], self._pos.ctypes.data + 8 * P)
        io.bind_input(n.attention_mask, "cpu", 0, np.int64, [1, m], self._mask.ctypes.data)
        key = (Lb, S, P == 0)
        if key == self._bound:                       # same KV shapes and addresses as the last call: they hold
            return S
        H, D = self.kv.num_kv_heads, self.kv.head_dim
        for j, (past, new) in enumerate(self._names):
            io.bind_input(past, dev, 0, dt, [1, H, Lb, D], a.ptr(j))              # [1, KVH, Lb, Hd]
            io.bind_output(new, dev, 0, dt, [1, H, S, D], out[j])                # [1, KVH, S, Hd]
        self._bound = key
        return S

    def _run(self, x: np.ndarray) -> np.ndarray:
        P = self.length
        if P and x.shape[1] > self.extend_max:         # the scratch takes extend_max rows: chunk
            for i in range(0, x.shape[1], self.extend_max):
                logits = self._run(x[:, i:i + self.extend_max])
            return logits
        S = self._bind(x)
        if self.device != "cpu":
            self.cuda.sync(self._stream)                # the arena's copies land before ORT reads it
        self.session.run_with_iobinding(self._io)
        a = self.arena
        if P == 0:
            a.bucket = S
        else:
            a.ensure(P, P + S)                          # repack to a larger bucket when full
            if self.device == "cpu":
                a.write(P, self._scratch[:, : a.blocks * S * self.kv.head_dim].reshape(a.tensors, a.blocks, S, -1))
            else:
                a.write_from(P, self._scratch_ptr, S)
                self.cuda.sync(self._stream)
        self.length = P + S
        return self._logits[0, 0]

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Run the prompt [S, D] (or [1, S, D]) on an empty cache; returns the last logits [V] (a view)."""
        x = np.asarray(inputs_embeds)
        x = np.ascontiguousarray(x.reshape(1, -1, x.shape[-1]), dtype=self.dtype)   # [1, S, D]
        if x.shape[-1] != self.hidden_size or x.shape[1] < 1:
            raise ValueError(f"prompt embeddings must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        self.reset()
        return self._run(x)

    def decode_one_token(self, token_embeds: np.ndarray) -> np.ndarray:
        """Append one token's embedding [D] to the cache; returns the next logits [V] (a view)."""
        self._token.reshape(-1)[:] = np.asarray(token_embeds).reshape(-1)
        return self._run(self._token)

    def extend(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append S tokens [S, D] to what is cached (one call per ``extend_max`` tokens); returns the last
        logits [V]."""
        x = np.asarray(inputs_embeds)
        x = np.ascontiguousarray(x.reshape(1, -1, x.shape[-1]), dtype=self.dtype)   # [1, S, D]
        if x.shape[-1] != self.hidden_size or x.shape[1] < 1:
            raise ValueError(f"embeddings must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        if self.length + x.shape[1] > self.capacity:
            raise ContextError(f"{self.length} cached + {x.shape[1]} new tokens exceed the cache capacity "
                               f"{self.capacity}")
        return self._run(x)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions: O(1), the rows beyond become masked bucket rows."""
        n = truncation(self.length, length)
        if n is not None:
            self.length = n
            if n == 0:
                self.arena.bucket = 0

    def close(self) -> None:
        """Free the device arena and scratch (CUDA; idempotent). The CPU arena is numpy's to free."""
        cuda = self.__dict__.pop("cuda", None)
        if cuda is not None:
            try:
                cuda.sync(self._stream)
                cuda.destroy_stream(self._stream)
                cuda.release()
            except Exception:
                pass                                # interpreter shutdown or a dead context

    def __del__(self):
        self.close()
