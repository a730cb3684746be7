"""TensorRT backend: the bundle's plans run with ``execute_async_v3`` on a CUDA stream; no torch on the device.

Supported: TensorRT 10 (JetPack 6.1/6.2: 10.3; JetPack 7.2: 10.16) and TensorRT 11 Python APIs, NVIDIA's
cuda-python for memory and streams (see ``cuda.py``). Both are imported lazily, with install hints.

* :class:`TrtVisionSession` runs the vision+gate plan behind the ``OrtSession`` interface
  (``run(feeds) -> {name: array}``, ``input_names``, ``output_names``, ``output_shapes``, ``provider``).
  Device and pinned host buffers are sized once for the largest shapes the profiles allow.
* :class:`TrtDecoder` runs the decoder plan behind the ``OrtDecoder`` interface (``prefill``,
  ``decode_one_token``, ``reset``, ``capacity``, ``length``, ``hidden_size``, ``dtype``). The plan has two
  optimization profiles (prefill: past 0, many tokens; decode: one token, past up to the context), chosen
  per call with :func:`select_profile`. An execution context is bound to one profile at a time: this
  backend keeps *one* context and switches it with ``set_optimization_profile_async`` (twice per request:
  to prefill, then to decode), because a second context would hold a second activation arena, which a
  Jetson's shared memory can ill afford. The KV cache is two ping-pong arena sets preallocated to capacity,
  exactly as ``OrtDecoder`` lays it out: step t binds past = set A (length P) and present = set B (length
  P+S) with ``set_tensor_address``; nothing is allocated per step. Every bound address is the start of
  a ``cudaMalloc`` block or a 256-byte-aligned offset into one (TensorRT requires 256-byte alignment), so
  ``position_ids`` are copied device-to-device from a preloaded ``arange`` instead of bound at an offset.
* Plans are refused unless built by this TensorRT version on this GPU (:func:`check_plan_compatible`,
  the message names the rebuild command), and a decoder's ``capacity`` must lie within what its
  profiles cover (:func:`plan_capacity`).
* Choosing a backend is ``pick.py``'s job; it imports this module lazily, and this module does not import
  it back (nor the generation loop: the errors and ``KVSpec`` come from ``base.py``).

Plans are memory-mapped for deserialization, so a multi-GB decoder plan is not copied into a Python bytes
object first (on Jetson, host and GPU share the same DRAM).
"""
from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .base import BackendError, ContextError, DecoderNames, kv_snapshot_length, truncation
from .cuda import CudaRuntime, round_up
from .trt_plan import ProfileSelectionError, check_plan_compatible, select_profile
from ..graph_spec import decoder_spec

TRT_HINT = ("TensorRT is not installed: on Jetson use the JetPack's system package (python3-libnvinfer); "
            "elsewhere pip install tensorrt-cu12 (or -cu13), whose libraries download from NVIDIA's index "
            "(only the bindings are on PyPI), or NVIDIA's tarball")

__all__ = ["TensorRTUnavailable", "TrtVisionSession", "TrtDecoder", "import_tensorrt", "this_device",
           "plan_capacity", "decoder_shapes"]


class TensorRTUnavailable(BackendError):
    """TensorRT cannot be imported, or no usable GPU is present."""


def import_tensorrt():
    """The tensorrt module, or :class:`TensorRTUnavailable` with the install hint (backend and builder alike)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(TRT_HINT) from e
    return trt


def this_device(trt=None, cuda: CudaRuntime | None = None, index: int = 0) -> dict[str, str]:
    """``{tensorrt_version, gpu_name, compute_capability}`` of this machine, as plans record them."""
    trt = trt or import_tensorrt()
    cuda = cuda or CudaRuntime()
    return {"tensorrt_version": str(trt.__version__), **cuda.device_facts(index)}


# -- engine access --------------------------------------------------------------------------------------

def _nptype(trt, dt) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dt))
    except (TypeError, AttributeError) as e:
        raise BackendError(f"TensorRT type {dt} has no numpy equivalent") from e


class _Engine:
    """A deserialized plan, its I/O tensors (name -> is_input, numpy dtype, declared shape) and profiles."""

    def __init__(self, trt, path: str | Path):
        self.trt, self.path = trt, Path(path)
        if not self.path.is_file():
            raise BackendError(f"TensorRT plan not found: {self.path}")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            self.engine = self.runtime.deserialize_cuda_engine(buf)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {self.path.name} (see the TensorRT log above); "
                               "rebuild it on this device with safeclip-build")
        e = self.engine
        self.io: dict[str, tuple[bool, np.dtype, tuple[int, ...]]] = {}
        for i in range(e.num_io_tensors):
            name = e.get_tensor_name(i)
            self.io[name] = (e.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                             _nptype(trt, e.get_tensor_dtype(name)), tuple(int(d) for d in e.get_tensor_shape(name)))
        self.inputs = [n for n, (inp, _, _) in self.io.items() if inp]
        self.outputs = [n for n, (inp, _, _) in self.io.items() if not inp]
        self.profiles = [{n: dict(zip(("min", "opt", "max"), (tuple(int(d) for d in s)
                                                               for s in e.get_tensor_profile_shape(n, k))))
                          for n in self.inputs if any(d < 0 for d in self.io[n][2])}
                         for k in range(e.num_optimization_profiles)]

    def require(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        missing = [n for n in inputs if n not in self.inputs] + [n for n in outputs if n not in self.outputs]
        if missing:
            raise BackendError(f"{self.path.name} lacks the tensors {', '.join(missing[:4])}: "
                               "the plan does not match the bundle's graph; rebuild it with safeclip-build")


class _Context:
    """One execution context on one stream; remembers the active profile."""

    def __init__(self, eng: _Engine, cuda: CudaRuntime):
        self.eng, self.cuda = eng, cuda
        self.ctx = eng.engine.create_execution_context()
        if self.ctx is None:
            raise BackendError(f"TensorRT could not create an execution context for {eng.path.name} (out of memory?)")
        self.stream = cuda.stream()
        self.profile = 0                                  # a new context starts on profile 0

    def use_profile(self, k: int) -> None:
        if k != self.profile:
            if not self.ctx.set_optimization_profile_async(k, int(self.stream)):
                raise BackendError(f"TensorRT refused to switch {self.eng.path.name} to profile {k}")
            self.profile = k

    def shape(self, name: str, shape: Sequence[int]) -> None:
        if not self.ctx.set_input_shape(name, tuple(int(d) for d in shape)):
            raise BackendError(f"TensorRT rejected shape {list(shape)} for '{name}' in profile {self.profile}")

    def bind(self, name: str, ptr: int) -> None:
        if not self.ctx.set_tensor_address(name, int(ptr)):
            raise BackendError(f"TensorRT rejected the address for '{name}'")

    def output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.ctx.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"TensorRT cannot tell the shape of output '{name}' ({list(shape)})")
        return shape

    def execute(self) -> None:
        if not self.ctx.execute_async_v3(int(self.stream)):
            raise BackendError(f"TensorRT execution of {self.eng.path.name} failed (see the TensorRT log above)")


def _check_record(record: Mapping | None, device: Mapping | None, bundle: str, trt, cuda) -> None:
    if record is not None:
        check_plan_compatible(record, device if device is not None else this_device(trt, cuda), bundle=bundle)


# -- vision + gate -------------------------------------------------------------------------------------

class TrtVisionSession:
    """The vision+gate plan behind the ``OrtSession`` interface. ``run`` returns fresh arrays."""

    provider = "tensorrt"

    def __init__(self, plan_path: str | Path, *, record: Mapping | None = None, device: Mapping | None = None,
                 bundle: str = "DIR", output_symbols: Mapping[str, Sequence] | None = None, trt=None,
                 cuda: CudaRuntime | None = None):
        trt = trt or import_tensorrt()
        self.cuda = cuda = cuda or CudaRuntime()
        _check_record(record, device, bundle, trt, cuda)
        self.eng = _Engine(trt, plan_path)
        self.c = _Context(self.eng, cuda)
        self.input_names, self.output_names = list(self.eng.inputs), list(self.eng.outputs)
        self.output_shapes = {}
        for n in self.output_names:                                 # dynamic dims named as the manifest names them
            decl, sym = self.eng.io[n][2], list((output_symbols or {}).get(n) or [])
            if sym and (len(sym) != len(decl) or any(d >= 0 and s != d for d, s in zip(decl, sym))):
                raise BackendError(f"{self.eng.path.name}: output '{n}' is {list(decl)}, the manifest says {sym}; "
                                   "rebuild the plan with safeclip-build")
            self.output_shapes[n] = [d if d >= 0 else (sym[i] if sym else None) for i, d in enumerate(decl)]
        most = {n: 0 for n in self.eng.io}                          # bytes: the largest shape any profile allows
        for k, prof in enumerate(self.eng.profiles or [{}]):
            self.c.use_profile(k)
            for n in self.input_names:
                shape = prof[n]["max"] if n in prof else self.eng.io[n][2]
                self.c.shape(n, shape)
                most[n] = max(most[n], int(np.prod(shape)) * self.eng.io[n][1].itemsize)
            for n in self.output_names:
                most[n] = max(most[n], int(np.prod(self.c.output_shape(n))) * self.eng.io[n][1].itemsize)
        self._dev = {n: cuda.malloc(b) for n, b in most.items()}
        self._host = {n: cuda.host_array(b, np.uint8) for n, b in most.items()}   # pinned staging
        self._lock = threading.Lock()                               # one context: one call at a time

    @classmethod
    def from_manifest(cls, manifest, **kw) -> "TrtVisionSession":
        """From a verified ``Manifest``: the ``vision_gate`` plan and its build record."""
        rec = _engine_record(manifest, "vision_gate")
        outs = {n: list(o.shape) for n, o in manifest.vision.outputs.items()}
        return cls(manifest.path(rec["file"]), record=rec, bundle=str(manifest.root), output_symbols=outs, **kw)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing} (the plan takes {self.input_names})")
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self.eng.io[n][1]) for n in self.input_names}
        with self._lock:
            c, cuda = self.c, self.cuda
            if self.eng.profiles:
                c.use_profile(select_profile(self.eng.profiles, {n: a.shape for n, a in arrays.items()
                                                                 if n in self.eng.profiles[0]}))
            for n, a in arrays.items():                              # e.g. pixel_values [B, 3, H, W]
                if a.nbytes > self._host[n].size:
                    raise ValueError(f"input '{n}' {list(a.shape)} exceeds the plan's largest profile shape")
                c.shape(n, a.shape)
                self._host[n][: a.nbytes] = a.reshape(-1).view(np.uint8)
                cuda.h2d(self._dev[n], self._host[n], a.nbytes, c.stream)
            for n, ptr in self._dev.items():
                c.bind(n, ptr)
            c.execute()
            shapes = {n: c.output_shape(n) for n in (outputs or self.output_names)}
            for n, shape in shapes.items():                          # image_features [B, N, D], class_probs [B, C]
                cuda.d2h(self._host[n], self._dev[n], int(np.prod(shape)) * self.eng.io[n][1].itemsize, c.stream)
            cuda.sync(c.stream)
            return {n: self._host[n][: int(np.prod(s)) * self.eng.io[n][1].itemsize].view(self.eng.io[n][1])
                    .reshape(s).copy() for n, s in shapes.items()}

    def close(self) -> None:
        _close(self)

    def __del__(self):
        _close(self)


def _close(obj) -> None:
    try:
        c = obj.__dict__.pop("c", None)
        if c is not None:
            obj.cuda.sync(c.stream)
            del c.ctx
            obj.cuda.destroy_stream(c.stream)
        obj.__dict__.pop("eng", None)
        obj.cuda.release()
    except Exception:
        pass                        # interpreter shutdown or a dead context: nothing more to free


# -- decoder -------------------------------------------------------------------------------------------

def decoder_shapes(kv, hidden: int, past: int, seq: int, batch: int = 1,
                   names: DecoderNames = DecoderNames()) -> dict[str, tuple[int, ...]]:
    """Input shapes of one decoder call: embeddings, mask, positions and every past key/value (the graph
    spec's dimensions at these sizes, ``runtime/graph_spec.py``)."""
    return decoder_spec(hidden, None, kv, names).shapes(batch=batch, seq=seq, past=past)


def _interval(profile: Mapping, family: Callable[[int], Mapping[str, Sequence[int]]]) -> tuple[int, int] | None:
    """The x range for which ``family(x)`` (each dim constant or x plus a constant) lies in ``profile``."""
    at0, at1 = family(0), family(1)
    lo, hi = 0, 1 << 62
    for name, spec in profile.items():
        for d0, d1, mn, mx in zip(at0[name], at1[name], spec["min"], spec["max"]):
            if d1 == d0:                                            # constant dim
                if not mn <= d0 <= mx:
                    return None
            else:                                                   # d = d0 + x
                lo, hi = max(lo, mn - d0), min(hi, mx - d0)
    return (lo, hi) if lo <= hi else None


def _covered_to(intervals: Sequence[tuple[int, int] | None], start: int) -> int:
    """The largest x such that every integer in [start, x] lies in one of ``intervals`` (start-1 if none)."""
    x, grew = start, True
    while grew:
        grew = False
        for iv in intervals:
            if iv is not None and iv[0] <= x <= iv[1]:
                x, grew = iv[1] + 1, True
    return x - 1


def plan_capacity(profiles: Sequence[Mapping], kv, hidden: int, batch: int = 1,
                  names: DecoderNames = DecoderNames()) -> int:
    """The largest capacity C for which every prefill (past 0, 1..C tokens) and every decode step (one token,
    past 0..C-1) lies in some profile; 0 when even one token is not covered."""
    def fits(p, past, seq):
        return {n: s for n, s in decoder_shapes(kv, hidden, past, seq, batch, names).items() if n in p}

    prefill = [_interval(p, lambda x: fits(p, 0, x)) for p in profiles]
    decode = [_interval(p, lambda x: fits(p, x, 1)) for p in profiles]
    return max(0, min(_covered_to(prefill, 1), _covered_to(decode, 0) + 1))


@dataclass
class _KVLayout:
    names: list[tuple[str, str]]          # (past, present) for every layer's key, then every layer's value
    slab: int                             # bytes of one arena (KVH * C * Hd * itemsize, rounded to 256)


class TrtDecoder:
    """The decoder plan behind the ``OrtDecoder`` interface, KV cache in device memory (module docstring).

    ``capacity`` defaults to min(``context_length``, what the plan's profiles cover: :func:`plan_capacity`);
    a larger one raises ``ContextError``. The logits ``prefill``/``decode_one_token`` return are a view of
    a pinned host buffer, valid until the next call.
    """

    device = "cuda"

    def __init__(self, plan_path: str | Path, kv, *, capacity: int | None = None, context_length: int | None = None,
                 record: Mapping | None = None, device: Mapping | None = None, bundle: str = "DIR",
                 weights_bytes: int | None = None, names: DecoderNames = DecoderNames(), trt=None,
                 cuda: CudaRuntime | None = None):
        trt = trt or import_tensorrt()
        self.cuda = cuda = cuda or CudaRuntime()
        _check_record(record, device, bundle, trt, cuda)
        self.eng = eng = _Engine(trt, plan_path)
        self.names = io = names                                   # embeddings, mask, positions, logits
        names = kv.names()                                        # (past, present) of every layer's k, v
        expected = [*io.inputs, *(p for p, _ in names)]
        eng.require(expected, [*io.outputs, *(o for _, o in names)])
        extra = sorted(set(eng.inputs) - set(expected))
        if extra:
            raise BackendError(f"{eng.path.name} takes inputs this runtime does not feed: {', '.join(extra[:4])}")
        self.kv, self.weights_bytes = kv, weights_bytes
        self.dtype = eng.io[io.inputs_embeds][1]
        self.hidden_size = int(eng.io[io.inputs_embeds][2][-1])
        self.vocab_size = int(eng.io[io.logits][2][-1])
        kv_dtype = eng.io[names[0][0]][1]
        if not eng.profiles:
            raise BackendError(f"{eng.path.name} has no optimization profiles: it cannot take a growing cache")
        first = names[0][0]
        for k, prof in enumerate(eng.profiles):                   # every KV tensor must share one range
            if any(prof[p] != prof[first] for p, _ in names):
                raise BackendError(f"{eng.path.name}: profile {k} gives the KV tensors different ranges")
        self._select = [{n: prof[n] for n in (*io.inputs, first)}
                        for prof in eng.profiles]
        limit = plan_capacity(eng.profiles, kv, self.hidden_size, names=io)
        if limit < 1:
            raise BackendError(f"{eng.path.name}: its profiles do not cover a one-token prompt")
        if capacity is not None and context_length is not None and capacity > context_length:
            raise ContextError(f"capacity {capacity} exceeds the model's context length {context_length}")
        if capacity is not None and not 1 <= capacity <= limit:
            raise ContextError(f"capacity {capacity} is outside the 1..{limit} tokens the engine's profiles cover; "
                               "export with a larger target context and rebuild")
        self.plan_capacity = limit
        self.capacity = C = int(capacity or min(limit, context_length or limit))
        self._kv = _KVLayout(names, round_up(kv.num_kv_heads * C * kv.head_dim * kv_dtype.itemsize))
        self.kv_bytes = 2 * len(names) * self._kv.slab                  # both ping-pong sets
        self.c = _Context(eng, cuda)
        # device buffers, all allocated here and never per step
        base = cuda.malloc(self.kv_bytes)                             # [set][layer k/v] arenas of KVH*C*Hd
        self._arena = [[base + (s * len(names) + j) * self._kv.slab for j in range(len(names))] for s in range(2)]
        isz = self.dtype.itemsize
        self._d_embeds = cuda.malloc(C * self.hidden_size * isz)      # inputs_embeds [1, S, D], S <= C
        mask_t, pos_t = eng.io[io.attention_mask][1], eng.io[io.position_ids][1]
        self._d_mask = cuda.malloc(C * mask_t.itemsize)               # attention_mask [1, P+S]: all ones
        self._d_pos_all = cuda.malloc(C * pos_t.itemsize)             # arange(C)
        self._d_pos = cuda.malloc(C * pos_t.itemsize)                 # position_ids [1, S] = arange[P:P+S]
        logits_t = eng.io[io.logits][1]
        self._d_logits = cuda.malloc(self.vocab_size * logits_t.itemsize)
        self._stage = cuda.host_array(C * self.hidden_size, self.dtype)      # pinned: prompt embeddings
        self._logits = cuda.host_array(self.vocab_size, logits_t)             # pinned: logits [V]
        init = cuda.host_array(C, mask_t)
        init[:] = 1
        cuda.h2d(self._d_mask, init, C * mask_t.itemsize, self.c.stream)
        init2 = cuda.host_array(C, pos_t)
        init2[:] = np.arange(C, dtype=pos_t)
        cuda.h2d(self._d_pos_all, init2, C * pos_t.itemsize, self.c.stream)
        cuda.sync(self.c.stream)
        self._cur, self.length = 0, 0

    @classmethod
    def from_manifest(cls, manifest, *, capacity: int | None = None, **kw) -> "TrtDecoder":
        """From a verified ``Manifest``; ``capacity`` defaults to min(model context, what the plan covers)."""
        rec = _engine_record(manifest, "decoder")
        graph = manifest.decoder
        ctx = manifest.model_facts.context_length or None
        return cls(manifest.path(rec["file"]), graph.kv, capacity=capacity, context_length=ctx, record=rec,
                   bundle=str(manifest.root), weights_bytes=manifest.file_bytes(graph.files), names=graph.names,
                   **kw)

    def reset(self, length: int = 0) -> None:
        """Forget the cache. ``length > 0`` pretends that many (stale) positions are cached: benchmarks only."""
        if not 0 <= length <= self.capacity:
            raise ContextError(f"length {length} outside the cache capacity {self.capacity}")
        self._cur, self.length = 0, int(length)

    def _run(self, S: int) -> np.ndarray:
        """One call on ``S`` tokens already staged in ``self._stage``; returns the logits [V] (a view)."""
        P = self.length
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        c, cuda, D = self.c, self.cuda, self.hidden_size
        shapes = decoder_shapes(self.kv, D, P, S, names=self.names)
        c.use_profile(select_profile(self._select, {n: shapes[n] for n in self._select[0]}))
        for n, s in shapes.items():
            c.shape(n, s)
        io = self.names
        isz, pos_isz = self.dtype.itemsize, self.eng.io[io.position_ids][1].itemsize
        cuda.h2d(self._d_embeds, self._stage, S * D * isz, c.stream)                  # [1, S, D]
        cuda.d2d(self._d_pos, self._d_pos_all + P * pos_isz, S * pos_isz, c.stream)   # [1, S] = P..P+S-1
        c.bind(io.inputs_embeds, self._d_embeds)
        c.bind(io.attention_mask, self._d_mask)
        c.bind(io.position_ids, self._d_pos)
        c.bind(io.logits, self._d_logits)                                              # [1, 1, V]
        src, dst = self._arena[self._cur], self._arena[1 - self._cur]
        for j, (past, present) in enumerate(self._kv.names):
            c.bind(past, src[j])                                    # [1, KVH, P, Hd]
            c.bind(present, dst[j])                                 # [1, KVH, P+S, Hd]
        c.execute()
        cuda.d2h(self._logits, self._d_logits, self._logits.nbytes, c.stream)
        cuda.sync(c.stream)
        self._cur, self.length = 1 - self._cur, P + S
        return self._logits

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Run the prompt [S, D] (or [1, S, D]) on an empty cache; returns the last logits [V] (a view)."""
        x = np.asarray(inputs_embeds)
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x
        if x.ndim != 2 or x.shape[-1] != self.hidden_size or x.shape[0] < 1:
            raise ValueError(f"prompt embeddings must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        if x.shape[0] > self.capacity:
            raise ContextError(f"prompt of {x.shape[0]} tokens exceeds the cache capacity {self.capacity}")
        self.reset()
        self._stage[: x.size] = x.reshape(-1)                     # cast to the graph's dtype while staging
        return self._run(x.shape[0])

    def decode_one_token(self, token_embeds: np.ndarray) -> np.ndarray:
        """Append one token's embedding [D] to the cache; returns the next logits [V] (a view)."""
        e = np.asarray(token_embeds).reshape(-1)
        if e.size != self.hidden_size:
            raise ValueError(f"a token embedding has {self.hidden_size} values, got {e.size}")
        self._stage[: e.size] = e
        return self._run(1)

    def takes(self, past: int, seq: int) -> bool:
        """Whether one call with ``past`` cached and ``seq`` new tokens lies in a profile of the plan."""
        shapes = decoder_shapes(self.kv, self.hidden_size, past, seq, names=self.names)
        try:
            select_profile(self._select, {n: shapes[n] for n in self._select[0]})
        except ProfileSelectionError:
            return False
        return True

    def extend(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append S tokens [S, D] to what is cached; returns the last logits [V] (a view). One call when a
        profile takes (past, S); else one token at a time through the decode profile (the targets' two
        profiles, prefill at past 0 and decode at seq 1, do not take a multi-token extension)."""
        x = np.asarray(inputs_embeds)
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x
        if x.ndim != 2 or x.shape[-1] != self.hidden_size or x.shape[0] < 1:
            raise ValueError(f"embeddings must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        if self.length + x.shape[0] > self.capacity:
            raise ContextError(f"{self.length} cached + {x.shape[0]} new tokens exceed the cache capacity "
                               f"{self.capacity}")
        if self.takes(self.length, x.shape[0]):
            self._stage[: x.size] = x.reshape(-1)
            return self._run(x.shape[0])
        for row in x:
            logits = self.decode_one_token(row)
        return logits

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions: each head's rows of a [1, KVH, L, Hd] tensor are packed
        for L, so every layer's key and value is repacked (one device copy per head) into the other arena set,
        which becomes current."""
        L, n = self.length, truncation(self.length, length)
        if not n:                                   # None: nothing to cut; 0: an empty cache
            if n == 0:
                self.reset()
            return
        H = self.kv.num_kv_heads
        row = self.kv.head_dim * self.eng.io[self._kv.names[0][0]][1].itemsize          # bytes of one position
        src, dst = self._arena[self._cur], self._arena[1 - self._cur]
        for j in range(len(self._kv.names)):
            for h in range(H):
                self.cuda.d2d(dst[j] + h * n * row, src[j] + h * L * row, n * row, self.c.stream)
        self.cuda.sync(self.c.stream)
        self._cur, self.length = 1 - self._cur, n

    # -- KV snapshots (the server's prefix cache) -------------------------------------------------------------
    def _kv_stage(self) -> np.ndarray:
        """A page-locked host buffer of one arena (allocated at the first snapshot, then reused)."""
        if getattr(self, "_kv_host", None) is None:
            dt = self.eng.io[self._kv.names[0][0]][1]
            self._kv_host = self.cuda.host_array(self.kv.num_kv_heads * self.capacity * self.kv.head_dim, dt)
        return self._kv_host

    def kv_read(self, length: int) -> list[np.ndarray]:
        """Host copies of the first ``length`` cached positions: one [1, KVH, length, Hd] array per
        ``KVSpec.names()`` pair, in the cache dtype (each arena copied through one pinned staging buffer)."""
        n, L = int(length), self.length
        if not 0 <= n <= L:
            raise ContextError(f"cannot read {n} positions of a cache holding {L}")
        H, D, stage = self.kv.num_kv_heads, self.kv.head_dim, self._kv_stage()
        out = []
        for ptr in self._arena[self._cur]:
            self.cuda.d2h(stage, ptr, H * L * D * stage.itemsize, self.c.stream)
            self.cuda.sync(self.c.stream)
            out.append(stage[: H * L * D].reshape(1, H, L, D)[:, :, :n].copy())
        return out

    def kv_write(self, arrays) -> None:
        """Replace the cache by ``arrays`` (as :meth:`kv_read` gives them); afterwards ``length`` is theirs.
        ``ContextError`` beyond the capacity, ``ValueError`` on a count, shape or dtype mismatch."""
        stage = self._kv_stage()
        n = kv_snapshot_length(arrays, self.kv, stage.dtype, self.capacity)
        size = self.kv.num_kv_heads * n * self.kv.head_dim
        dst = 1 - self._cur
        for j, a in enumerate(arrays):
            stage[:size] = a.reshape(-1)
            self.cuda.h2d(self._arena[dst][j], stage, size * stage.itemsize, self.c.stream)
            self.cuda.sync(self.c.stream)                 # the staging buffer is refilled for the next array
        self._cur, self.length = dst, n

    def close(self) -> None:
        _close(self)

    def __del__(self):
        _close(self)


def _engine_record(manifest, name: str) -> dict:
    rec = manifest.engines.get(name)
    if not rec:
        raise BackendError(f"{manifest.root}: no TensorRT engine for '{name}'; build the engines on this device: "
                           f"safeclip-build --bundle {manifest.root}")
    if rec.get("file") not in manifest.files:
        raise BackendError(f"{manifest.root}: engine file '{rec.get('file')}' is not hashed in the manifest; "
                           f"rebuild with safeclip-build --bundle {manifest.root}")
    return rec
