"""ONNX Runtime: sessions for the vision+gate graph, and :class:`OrtDecoder` for the language model.

Supported: CPU always; the CUDA execution provider when onnxruntime-gpu has it. Threads: an
explicit ``threads`` argument, else ``SAFECLIP_THREADS``, else ONNX Runtime's default; the vision session
and the decoder session both honour it (:func:`make_options`).

KV cache design of :class:`OrtDecoder` (see ``export/decoder.py`` for the graph): the graph reads ``past``
[1, KVH, P, Hd] and writes ``present`` [1, KVH, P+S, Hd] = past followed by the new keys. ORT binds outputs
with their exact shape, and a [1, KVH, L, Hd] tensor is contiguous only when its rows are packed for that
very L, so a present cannot be a strided view into a capacity-sized [1, KVH, C, Hd] buffer. Instead each
layer's key and value owns two flat *arenas* of KVH*C*Hd elements (C = capacity); a length-L tensor is the
first KVH*L*Hd elements of an arena, viewed as [1, KVH, L, Hd]. Step t binds past = arena set A (length P)
and present = arena set B (length P+S); step t+1 swaps them (ping-pong). Nothing is allocated per step:
ORT writes straight into the arenas and the logits into a preallocated [1, 1, V] buffer.

Trade-offs: two arena sets hold twice the cache memory (LLaVA-1.5-7B fp16 at C = 4096: 2 x 2.1 GB), and
the graph's Concat rewrites the whole cache every step (reads P, writes P+1 rows per layer): that copy is
as large as the attention's own read of the cache, small against the weight read while P is short
(``scripts/kv_costs.py`` measures both). An in-place cache (graph writes only the new row at an offset)
would remove the copy and the second arena, but needs a different graph (ScatterND or a TensorRT KV
plugin); this graph stays plain ONNX that ORT and TensorRT both parse.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..messages import one_line
from .base import BackendError, ContextError, DecoderNames, KVSpec, kv_snapshot_length, truncation

__all__ = ["BackendError", "OrtSession", "OrtDecoder", "available_providers", "make_session", "make_options"]


_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def make_options(threads: int | None = None):
    """ORT session options for every session of a bundle: all graph optimizations, and ``threads`` intra-op
    threads (default ``SAFECLIP_THREADS``; unset or 0: ONNX Runtime's own default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    n = threads or int(os.environ.get("SAFECLIP_THREADS", "0") or 0)
    if n:
        so.intra_op_num_threads = n
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


# ---------------------------------------------------------------------------------------------------------
class OrtDecoder:
    """ONNX Runtime decoder session with a preallocated, I/O-bound ping-pong KV cache (module docstring).

    ``capacity`` is the most tokens the cache holds (prompt + generated); at most the model's context
    length. ``device="cuda"`` puts the arenas in GPU memory (needs onnxruntime-gpu and the CUDA provider).
    ``session_options`` (default: :func:`make_options` of ``threads``) configure the session. ``names`` are
    the graph's tensor names besides the KV cache (the manifest's ``graphs.decoder.names``).
    """

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, providers: Sequence | None = None,
                 session_options=None, threads: int | None = None, device: str = "cpu",
                 weights_bytes: int | None = None, names: DecoderNames = DecoderNames()):
        import onnxruntime as ort

        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device '{device}' (supported: cpu, cuda)")
        providers = list(providers or (["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]))
        so = session_options if session_options is not None else make_options(threads)
        self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
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
        self._slab = H * self.capacity * D                                  # elements per arena
        if device == "cpu":
            self._arena = np.zeros((2, 2 * L, self._slab), self.dtype)       # [set, layer k/v, KVH*C*Hd]
            self._ptr = [[self._arena[s, j].ctypes.data for j in range(2 * L)] for s in range(2)]
        else:
            self._arena = [[ort.OrtValue.ortvalue_from_shape_and_type([self._slab], self.dtype.type, "cuda", 0)
                            for _ in range(2 * L)] for _ in range(2)]
            self._ptr = [[v.data_ptr() for v in row] for row in self._arena]
        self._mask = np.ones((1, self.capacity), np.int64)                 # attention_mask [1, P+S] = prefix
        self._pos = np.arange(self.capacity, dtype=np.int64)[None]          # position_ids [1, S] = a slice
        self._logits = np.zeros((1, 1, self.vocab_size), self.dtype)       # logits [1, 1, V]
        self._token = np.zeros((1, 1, self.hidden_size), self.dtype)       # one token's embedding [1, 1, D]
        self._io = self.session.io_binding()
        self._io.bind_output(names.logits, "cpu", 0, self.dtype, list(self._logits.shape), self._logits.ctypes.data)
        self.weights_bytes = weights_bytes
        self._cur, self.length = 0, 0

    @classmethod
    def from_manifest(cls, root: str | Path, graph, *, capacity: int | None = None,
                      context_length: int | None = None, **kw) -> "OrtDecoder":
        """From a bundle folder and its ``graphs.decoder`` entry (a ``DecoderGraph``, or its JSON);
        capacity defaults to the context length."""
        from ..contract import DecoderGraph

        g = graph if isinstance(graph, DecoderGraph) else DecoderGraph.from_json(graph)
        root = Path(root)
        cap = capacity or context_length
        if cap is None:
            raise ValueError("give capacity or the model's context_length")
        if context_length is not None and cap > context_length:
            raise ContextError(f"capacity {cap} exceeds the model's context length {context_length}")
        size = sum(os.path.getsize(root / f) for f in g.files)
        return cls(root / g.file, g.kv, capacity=cap, weights_bytes=size, names=g.names, **kw)

    def reset(self, length: int = 0) -> None:
        """Forget the cache. ``length > 0`` pretends that many (stale) positions are cached: benchmarks only."""
        if not 0 <= length <= self.capacity:
            raise ContextError(f"length {length} outside the cache capacity {self.capacity}")
        self._cur, self.length = 0, int(length)

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the cached key and value of ``layer``: [1, KVH, length, Hd] each (CPU arenas only)."""
        if self.device != "cpu":
            raise ValueError("cache views need CPU arenas")
        shape = (1, self.kv.num_kv_heads, self.length, self.kv.head_dim)
        n = int(np.prod(shape))
        a = self._arena[self._cur]
        return a[layer, :n].reshape(shape), a[self.kv.num_layers + layer, :n].reshape(shape)

    def _bind(self, x: np.ndarray) -> int:
        """Bind one call's inputs and outputs; ``x`` [1, S, D] must stay alive until the run. Returns P+S."""
        P, S = self.length, x.shape[1]
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        io, dt, dev = self._io, self.dtype, self.device
        n = self.names
        io.bind_input(n.inputs_embeds, "cpu", 0, dt, [1, S, self.hidden_size], x.ctypes.data)
        io.bind_input(n.attention_mask, "cpu", 0, np.int64, [1, P + S], self._mask.ctypes.data)
        io.bind_input(n.position_ids, "cpu", 0, np.int64, [1, S], self._pos.ctypes.data + 8 * P)
        past_shape = [1, self.kv.num_kv_heads, P, self.kv.head_dim]
        present_shape = [1, self.kv.num_kv_heads, P + S, self.kv.head_dim]
        src, dst = self._ptr[self._cur], self._ptr[1 - self._cur]
        for j, (past, present) in enumerate(self._names):
            io.bind_input(past, dev, 0, dt, past_shape, src[j])
            io.bind_output(present, dev, 0, dt, present_shape, dst[j])
        return P + S

    def _run(self, x: np.ndarray) -> np.ndarray:
        total = self._bind(x)
        self.session.run_with_iobinding(self._io)
        self._cur, self.length = 1 - self._cur, total
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
        """Append S tokens [S, D] to what is cached (one call, past P = ``length``); returns the last logits [V]."""
        x = np.asarray(inputs_embeds)
        x = np.ascontiguousarray(x.reshape(1, -1, x.shape[-1]), dtype=self.dtype)   # [1, S, D]
        if x.shape[-1] != self.hidden_size or x.shape[1] < 1:
            raise ValueError(f"embeddings must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        return self._run(x)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions. A cached [1, KVH, L, Hd] tensor packs each head's L rows
        together, so keeping L' < L rows moves every head after the first: each layer's key and value are
        repacked into the other arena set (which becomes current). CUDA arenas go through host memory."""
        L, n = self.length, truncation(self.length, length)
        if not n:                                   # None: nothing to cut; 0: an empty cache
            if n == 0:
                self.reset()
            return
        H, D = self.kv.num_kv_heads, self.kv.head_dim
        for j in range(2 * self.kv.num_layers):
            if self.device == "cpu":
                src, dst = self._arena[self._cur, j], self._arena[1 - self._cur, j]
                dst[: H * n * D].reshape(H, n, D)[:] = src[: H * L * D].reshape(H, L, D)[:, :n]
            else:
                host = self._arena[self._cur][j].numpy()
                out = np.zeros_like(host)
                out[: H * n * D].reshape(H, n, D)[:] = host[: H * L * D].reshape(H, L, D)[:, :n]
                self._arena[1 - self._cur][j].update_inplace(out)
        self._cur, self.length = 1 - self._cur, n

    # -- KV snapshots (the server's prefix cache) -------------------------------------------------------------
    def kv_read(self, length: int) -> list[np.ndarray]:
        """Host copies of the first ``length`` cached positions: one [1, KVH, length, Hd] array per
        ``KVSpec.names()`` pair (every layer's key, then every layer's value), in the cache dtype."""
        n = int(length)
        if not 0 <= n <= self.length:
            raise ContextError(f"cannot read {n} positions of a cache holding {self.length}")
        H, D, L = self.kv.num_kv_heads, self.kv.head_dim, self.length
        out = []
        for j in range(2 * self.kv.num_layers):
            flat = self._arena[self._cur, j] if self.device == "cpu" else self._arena[self._cur][j].numpy()
            out.append(flat[: H * L * D].reshape(1, H, L, D)[:, :, :n].copy())
        return out

    def kv_write(self, arrays: Sequence[np.ndarray]) -> None:
        """Replace the cache by ``arrays`` (as :meth:`kv_read` gives them); afterwards ``length`` is theirs.
        ``ContextError`` beyond the capacity, ``ValueError`` on a count, shape or dtype mismatch."""
        n = kv_snapshot_length(arrays, self.kv, self.dtype, self.capacity)
        H, D = self.kv.num_kv_heads, self.kv.head_dim
        dst = 1 - self._cur
        for j, a in enumerate(arrays):
            if self.device == "cpu":
                self._arena[dst, j][: H * n * D].reshape(1, H, n, D)[:] = a
            else:
                host = np.zeros(self._slab, self.dtype)
                host[: H * n * D] = np.ascontiguousarray(a).reshape(-1)
                self._arena[dst][j].update_inplace(host)
        self._cur, self.length = dst, n

