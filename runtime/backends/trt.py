"""TensorRT backend: the bundle's plans run with ``execute_async_v3`` on a CUDA stream; no torch on the device.

Supported: TensorRT 10 (JetPack 6.1/6.2: 10.3; JetPack 7.2: 10.16) and TensorRT 11 Python APIs, NVIDIA's
cuda-python for memory and streams (see ``cuda.py``). Both are imported lazily, with install hints.

* :class:`TrtVisionSession` runs the vision+gate plan behind the ``OrtSession`` interface
  (``run(feeds) -> {name: array}``, ``input_names``, ``output_names``, ``output_shapes``, ``provider``).
  Device and pinned host buffers are sized once for the largest shapes the profiles allow.
* :class:`TrtDecoder` runs the decoder plan behind the ``OrtDecoder`` interface (``prefill``,
  ``decode_one_token``, ``extend``, ``truncate``, ``kv_read``/``kv_write``, ``reset``, ``capacity``, ``length``,
  ``hidden_size``, ``dtype``). The plan has three optimization profiles (prefill: past 0, many tokens;
  decode: one token on a past of 0..C rows; extend: 2..E tokens on a past of 1..C rows, the follow-up turns
  of ``chat.py``), chosen per call with :func:`select_profile`. An execution context is bound to one profile
  at a time: this backend keeps *one* context and switches it with ``set_optimization_profile_async``,
  because a second context would hold a second activation arena, which a Jetson's shared memory can ill
  afford. The KV cache is ONE arena in device memory, laid out and moved as ``arena.py`` describes
  (bucket-packed, the bound ``past`` is the bucket with its unused rows masked out, a prefill's new rows
  written there by the graph, later calls' new rows copied from a small scratch with one
  ``cudaMemcpy2DAsync`` per layer key/value, all on the context's stream); addresses are bound with
  ``set_tensor_address`` and nothing is allocated per step. Every bound address is the start of a
  ``cudaMalloc`` block or a 256-byte-aligned offset into one (TensorRT requires 256-byte alignment), so
  ``position_ids`` are copied device-to-device from a preloaded ``arange`` instead of bound at an offset.
* Plans are refused unless built by this TensorRT version on this GPU (:func:`check_plan_compatible`,
  the message names the rebuild command), and a decoder's ``capacity`` must lie within what its
  profiles cover (:func:`plan_capacity`).
* Choosing a backend is ``pick.py``'s job; it imports this module lazily, and this module does not import
  it back (nor the generation loop: the errors come from ``base.py``, tensor names and ``KVSpec`` from
  ``graph_spec.py``).

Plans are memory-mapped for deserialization, so a multi-GB decoder plan is not copied into a Python bytes
object first (on Jetson, host and GPU share the same DRAM).
"""
from __future__ import annotations

import mmap
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .arena import EXTEND_MAX, DeviceArena, check_kv_arrays
from ..graph_spec import DecoderNames
from .base import BackendError, ContextError, truncation
from .cuda import CudaRuntime, round_up
from .slots import SlotOps
from .trt_plan import (ProfileSelectionError, check_plan_compatible, decoder_shapes, plan_batch, plan_capacity,
                       plan_extend, plan_prefill, select_profile)

TRT_HINT = ("TensorRT is not installed: on Jetson use the JetPack's system package (python3-libnvinfer); "
            "elsewhere pip install tensorrt-cu12 (or -cu13), whose libraries download from NVIDIA's index "
            "(only the bindings are on PyPI), or NVIDIA's tarball")

__all__ = ["TensorRTUnavailable", "TrtVisionSession", "TrtDecoder", "TrtSlotDecoder", "import_tensorrt",
           "this_device", "plan_capacity", "plan_batch", "decoder_shapes"]


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
    """``{tensorrt_version, gpu_name, compute_capability, sm_count, memory_class_gib}`` of this machine, as plans
    record them (``trt_plan.DEVICE_FIELDS``)."""
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
    """One execution context on one stream; remembers the active profile. Shared by a :class:`TrtDecoder` and
    the :class:`TrtSlotDecoder` made on it (``users`` counts them): the last one to close destroys it.

    Activation memory is ``ON_PROFILE_CHANGE`` (``ExecutionContextAllocationStrategy``, TensorRT 10.0+): TensorRT
    holds the active profile's, reallocated when the profile changes, instead of the default ``STATIC`` maximum
    over every profile for the context's life (a prefill chunk's attention scores are hundreds of MB that a
    decode step never needs; on a Jetson that memory is the shared DRAM)."""

    STRATEGY = "ON_PROFILE_CHANGE"

    def __init__(self, eng: _Engine, cuda: CudaRuntime):
        self.eng, self.cuda = eng, cuda
        strategy = getattr(eng.trt.ExecutionContextAllocationStrategy, self.STRATEGY)
        self.ctx = eng.engine.create_execution_context(strategy)
        if self.ctx is None:
            raise BackendError(f"TensorRT could not create an execution context for {eng.path.name} (out of memory?)")
        self.stream = cuda.stream()
        self.profile = 0                                  # a new context starts on profile 0
        self.lock = threading.RLock()                     # a TrtDecoder and its TrtSlotDecoder share the context
        self.users = 1

    def release(self) -> None:
        """One user less; the last one waits for the stream, then destroys the context and the stream."""
        self.users -= 1
        if self.users == 0:
            self.cuda.sync(self.stream)
            del self.ctx
            self.cuda.destroy_stream(self.stream)

    def use_profile(self, k: int) -> None:
        if k != self.profile:
            try:        # the bindings raise RuntimeError on failure, never return False (pyCore.cpp, 10.3 to 11.1)
                self.ctx.set_optimization_profile_async(k, int(self.stream))
            except RuntimeError as e:
                raise BackendError(f"TensorRT refused to switch {self.eng.path.name} to profile {k} ({e}; out of "
                                   "device memory for the profile's activations?)") from None
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
    """Free ``obj``'s buffers and its share of the execution context (idempotent)."""
    try:
        c = obj.__dict__.pop("c", None)
        if c is not None:
            obj.cuda.sync(c.stream)
            c.release()
        obj.__dict__.pop("eng", None)
        obj.cuda.release()
    except Exception:
        pass                        # interpreter shutdown or a dead context: nothing more to free


# -- decoder -------------------------------------------------------------------------------------------

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
        names = kv.names()                                        # (past, new) in the KV order (KVSpec)
        expected = [*io.inputs, *(p for p, _ in names)]
        eng.require(expected, [*io.outputs, *(o for _, o in names)])
        extra = sorted(set(eng.inputs) - set(expected))
        if extra:
            raise BackendError(f"{eng.path.name} takes inputs this runtime does not feed: {', '.join(extra[:4])}")
        self.kv, self.weights_bytes, self._kv_names = kv, weights_bytes, names
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
        self.prefill_max = min(C, plan_prefill(eng.profiles, kv, self.hidden_size, names=io))   # one prefill call
        self.extend_max = E = plan_extend(eng.profiles, kv, self.hidden_size, C, EXTEND_MAX, names=io)
        self.max_batch = plan_batch(eng.profiles, kv, self.hidden_size, C, names=io)   # TrtSlotDecoder's limit
        self.c = _Context(eng, cuda)
        # device buffers, all allocated here and never per step
        T, H, Hd = len(names), kv.num_kv_heads, kv.head_dim
        self.arena = DeviceArena(cuda, self.c.stream, T, H, Hd, C, kv_dtype)    # [2L][KVH, Lb, Hd], one arena
        slab = round_up(H * E * Hd * kv_dtype.itemsize)
        base = cuda.malloc(T * slab)                                  # new rows [2L][KVH, S, Hd], S <= E
        self._scratch = [base + j * slab for j in range(T)]
        self.kv_bytes = self.arena.nbytes
        isz = self.dtype.itemsize
        self._d_embeds = cuda.malloc(C * self.hidden_size * isz)      # inputs_embeds [1, S, D], S <= C
        mask_t, pos_t = eng.io[io.attention_mask][1], eng.io[io.position_ids][1]
        self._d_mask = cuda.malloc((2 * C + 1) * mask_t.itemsize)     # attention_mask [1, Lb+S]
        self._mask = cuda.host_array(2 * C + 1, mask_t)               # pinned: its host side
        self._d_pos_all = cuda.malloc(C * pos_t.itemsize)             # arange(C)
        self._d_pos = cuda.malloc(C * pos_t.itemsize)                 # position_ids [1, S] = arange[P:P+S]
        logits_t = eng.io[io.logits][1]
        self._d_logits = cuda.malloc(self.vocab_size * logits_t.itemsize)
        self._stage = cuda.host_array(C * self.hidden_size, self.dtype)      # pinned: prompt embeddings
        self._logits = cuda.host_array(self.vocab_size, logits_t)             # pinned: logits [V]
        self._host = cuda.host_array(self.arena.slab, kv_dtype)               # pinned: kv_read / kv_write
        init = cuda.host_array(C, pos_t)
        init[:] = np.arange(C, dtype=pos_t)
        cuda.h2d(self._d_pos_all, init, C * pos_t.itemsize, self.c.stream)
        cuda.sync(self.c.stream)
        self.length = 0

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
        self.length = self.arena.reset(length)

    def _run(self, S: int) -> np.ndarray:
        """One call on ``S`` tokens already staged in ``self._stage``; returns the logits [V] (a view)."""
        with self.c.lock:
            return self._run_locked(S)

    def _run_locked(self, S: int) -> np.ndarray:
        P, a = self.length, self.arena
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        if P == 0:                                  # prefill: the graph writes the arena, packed for S
            a.bucket = 0
        c, cuda, D = self.c, self.cuda, self.hidden_size
        Lb = a.bucket
        shapes = decoder_shapes(self.kv, D, Lb, S, names=self.names)           # past = the bucket
        c.use_profile(select_profile(self._select, {n: shapes[n] for n in self._select[0]}))
        for n, s in shapes.items():
            c.shape(n, s)
        io = self.names
        isz, pos_isz = self.dtype.itemsize, self.eng.io[io.position_ids][1].itemsize
        m = a.mask(self._mask, P, S)                                                   # [1, Lb+S]
        cuda.h2d(self._d_mask, self._mask, m * self._mask.itemsize, c.stream)
        cuda.h2d(self._d_embeds, self._stage, S * D * isz, c.stream)                  # [1, S, D]
        cuda.d2d(self._d_pos, self._d_pos_all + P * pos_isz, S * pos_isz, c.stream)   # [1, S] = P..P+S-1
        c.bind(io.inputs_embeds, self._d_embeds)
        c.bind(io.attention_mask, self._d_mask)
        c.bind(io.position_ids, self._d_pos)
        c.bind(io.logits, self._d_logits)                                              # [1, 1, V]
        for j, (past, new) in enumerate(self._kv_names):
            c.bind(past, a.ptr(j))                                  # [1, KVH, Lb, Hd]
            c.bind(new, a.ptr(j) if P == 0 else self._scratch[j])   # [1, KVH, S, Hd]
        c.execute()
        if P == 0:
            a.bucket = S
        else:                                                        # same stream: after the execution
            a.ensure(P, P + S)
            a.write_from(P, self._scratch, S)
        cuda.d2h(self._logits, self._d_logits, self._logits.nbytes, c.stream)
        cuda.sync(c.stream)
        self.length = P + S
        return self._logits

    def _stage_rows(self, inputs_embeds, what: str) -> np.ndarray:
        x = np.asarray(inputs_embeds)
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x
        if x.ndim != 2 or x.shape[-1] != self.hidden_size or x.shape[0] < 1:
            raise ValueError(f"{what} must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        return x

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Run the prompt [S, D] (or [1, S, D]) on an empty cache; returns the last logits [V] (a view). A prompt
        longer than the prefill profile takes (``prefill_max``) goes on in extensions (chunked prefill)."""
        x = self._stage_rows(inputs_embeds, "prompt embeddings")
        if x.shape[0] > self.capacity:
            raise ContextError(f"prompt of {x.shape[0]} tokens exceeds the cache capacity {self.capacity}")
        self.reset()
        return self._feed(x)

    def _feed(self, x: np.ndarray) -> np.ndarray:
        """Append ``x`` [S, D] in calls the profiles take: a first chunk of up to ``prefill_max`` tokens on an
        empty cache, then chunks of up to ``extend_max`` (one-token steps when the plan has no extend profile)."""
        i = 0
        while i < x.shape[0]:
            step = self.prefill_max if self.length == 0 else self.extend_max
            chunk = x[i:i + step]
            self._stage[: chunk.size] = chunk.reshape(-1)             # cast to the graph's dtype while staging
            logits = self._run(chunk.shape[0])
            i += step
        return logits

    def decode_one_token(self, token_embeds: np.ndarray) -> np.ndarray:
        """Append one token's embedding [D] to the cache; returns the next logits [V] (a view)."""
        e = np.asarray(token_embeds).reshape(-1)
        if e.size != self.hidden_size:
            raise ValueError(f"a token embedding has {self.hidden_size} values, got {e.size}")
        self._stage[: e.size] = e
        return self._run(1)

    def takes(self, past: int, seq: int) -> bool:
        """Whether one call with a bound past (bucket) of ``past`` rows and ``seq`` new tokens lies in a profile."""
        shapes = decoder_shapes(self.kv, self.hidden_size, past, seq, names=self.names)
        try:
            select_profile(self._select, {n: shapes[n] for n in self._select[0]})
        except ProfileSelectionError:
            return False
        return True

    def extend(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append S tokens [S, D] to what is cached; returns the last logits [V] (a view). One call through the
        extend profile per ``extend_max`` tokens (:func:`plan_extend`; a prefill when nothing is cached)."""
        x = self._stage_rows(inputs_embeds, "embeddings")
        if self.length + x.shape[0] > self.capacity:
            raise ContextError(f"{self.length} cached + {x.shape[0]} new tokens exceed the cache capacity "
                               f"{self.capacity}")
        return self._feed(x)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions: O(1), the rows beyond become masked bucket rows."""
        n = truncation(self.length, length)
        if n is not None:
            self.length = n

    def kv_read(self, length: int) -> list[np.ndarray]:
        """Host copies of the first ``length`` cached positions, [1, KVH, length, Hd] each, in the KV order
        (``graph_spec.KVSpec``: layer by layer, key then value)."""
        if not 0 <= int(length) <= self.length:
            raise ContextError(f"cannot read {length} positions of {self.length} cached")
        return self.arena.read(int(length), self._host)

    def kv_write(self, arrays: Sequence[np.ndarray]) -> None:
        """Replace the cache by ``arrays`` (as :meth:`kv_read` gives them); afterwards ``length`` is theirs."""
        n = check_kv_arrays(arrays, len(self._kv_names), self.kv.num_kv_heads, self.kv.head_dim,
                            self.arena.dtype, self.capacity)
        self.arena.load(arrays, self._host)
        self.length = n

    def close(self) -> None:
        _close(self)

    def __del__(self):
        _close(self)


class TrtSlotDecoder(SlotOps):
    """``slots`` sequences in one device KV arena on a :class:`TrtDecoder`'s plan and execution context (its
    weights and activation memory are shared, its calls serialised by the context's lock; closing either one
    leaves the context to the other): the batched decoder ``scheduler.Scheduler`` drives (``slots.py``). A decode
    step of 1..N sequences runs in the plan's one ``decode`` profile (batch 1..N, ``export/targets.py``), so the
    batch size never switches profiles; prefill (in chunks of ``prefill_max``) and extension of one slot in the
    prefill/extend profiles at batch 1. ``slots`` above what the profiles cover (:func:`plan_batch`) is refused
    with the re-export command.

    Every bound address is 256-byte aligned, as TensorRT requires: the arena's buckets are whole multiples of
    ``align`` rows (``arena.py``), so each slot's [KVH, Lb, Hd] block, bound as ``past`` by :meth:`extend`,
    starts aligned. The arena therefore holds the capacity rounded up to ``align`` rows; that rounded capacity
    must lie in the profiles, so the capacity is lowered to a multiple of ``align`` when it would not.
    """

    device = "cuda"

    def __init__(self, dec: TrtDecoder, slots: int, capacity: int | None = None):
        from math import gcd

        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.base, self.eng, self.c, self.kv, self.names = dec, dec.eng, dec.c, dec.kv, dec.names
        self.cuda = cuda = CudaRuntime(dec.cuda.rt)                  # its own buffers; close() frees only those
        self.dtype, self.hidden_size, self.vocab_size = dec.dtype, dec.hidden_size, dec.vocab_size
        self._kv_names, self._select, self.weights_bytes = dec._kv_names, dec._select, dec.weights_bytes
        kv, eng, io = dec.kv, dec.eng, dec.names
        kv_dtype = eng.io[self._kv_names[0][0]][1]
        T, H, Hd = len(self._kv_names), kv.num_kv_heads, kv.head_dim
        align = 256 // gcd(256, H * Hd * kv_dtype.itemsize)          # rows per bucket step: aligned slot blocks
        C = int(capacity or dec.capacity)
        if not 1 <= C <= dec.plan_capacity:
            raise ContextError(f"capacity {C} is outside the 1..{dec.plan_capacity} tokens the engine's profiles "
                               "cover")
        rows = -(-C // align) * align                                # what the arena's buckets reach
        if rows > dec.plan_capacity:
            C = rows = dec.plan_capacity // align * align
        self.capacity, self.slots, self.align = C, int(slots), align
        self.extend_max = plan_extend(eng.profiles, kv, self.hidden_size, rows, EXTEND_MAX, names=io)
        self.prefill_max = min(C, plan_prefill(eng.profiles, kv, self.hidden_size, names=io))
        self.max_batch = plan_batch(eng.profiles, kv, self.hidden_size, rows, names=io)
        if self.slots > self.max_batch:
            raise BackendError(f"{eng.path.name}'s profiles batch at most {self.max_batch} sequences per decode step, "
                               f"not {self.slots}: lower --max-batch, or re-export with --max-batch {self.slots} "
                               "and rebuild the engines (safeclip-build)")
        self.arena = DeviceArena(cuda, self.c.stream, T, H, Hd, C, kv_dtype, slots=self.slots, align=align)
        rows = max(C, self.slots)                                    # one slot's prompt, or one row per slot
        slab = round_up(H * rows * Hd * kv_dtype.itemsize)
        base = cuda.malloc(T * slab)
        self._scratch = [base + j * slab for j in range(T)]
        self._init_slots()
        mask_t, pos_t = eng.io[io.attention_mask][1], eng.io[io.position_ids][1]
        logits_t = eng.io[io.logits][1]
        self._d_embeds = cuda.malloc(rows * self.hidden_size * self.dtype.itemsize)    # [B, S, D], B*S <= rows
        self._stage = cuda.host_array(rows * self.hidden_size, self.dtype)
        self._d_mask = cuda.malloc(self._bmask.size * mask_t.itemsize)                 # [B, Lb+S]
        self._hmask = cuda.host_array(self._bmask.size, mask_t)
        self._d_pos = cuda.malloc(self._bpos.size * pos_t.itemsize)                    # [B, 1] or [1, S]
        self._hpos = cuda.host_array(self._bpos.size, pos_t)
        self._d_logits = cuda.malloc(self.slots * self.vocab_size * logits_t.itemsize)  # [B, 1, V]
        self._logits = cuda.host_array(self.slots * self.vocab_size, logits_t)
        self._host = cuda.host_array(H * self.arena.capacity * Hd, kv_dtype)          # pinned: slot_read
        self.c.users += 1                                            # the context outlives whichever closes first
        self._holds_context = True

    @classmethod
    def sharing(cls, dec: TrtDecoder, slots: int, capacity: int | None = None) -> "TrtSlotDecoder":
        return cls(dec, slots, capacity)

    def _call(self, x, mask, pos, past, lb):
        B, S, D = x.shape
        c, cuda, io = self.c, self.cuda, self.names
        shapes = decoder_shapes(self.kv, D, lb, S, batch=B, names=io)
        with c.lock:
            c.use_profile(select_profile(self._select, {n: shapes[n] for n in self._select[0]}))
            for n, s in shapes.items():
                c.shape(n, s)
            nx, nm, npos = x.size, mask.size, pos.size
            self._stage[:nx] = x.reshape(-1)
            self._hmask[:nm] = mask.reshape(-1)
            self._hpos[:npos] = pos.reshape(-1)
            cuda.h2d(self._d_embeds, self._stage, nx * self._stage.itemsize, c.stream)
            cuda.h2d(self._d_mask, self._hmask, nm * self._hmask.itemsize, c.stream)
            cuda.h2d(self._d_pos, self._hpos, npos * self._hpos.itemsize, c.stream)
            c.bind(io.inputs_embeds, self._d_embeds)
            c.bind(io.attention_mask, self._d_mask)
            c.bind(io.position_ids, self._d_pos)
            c.bind(io.logits, self._d_logits)
            for j, (p, o) in enumerate(self._kv_names):
                c.bind(p, self.arena.ptr(j) + past)                  # [B, KVH, lb, Hd]: 256-byte aligned
                c.bind(o, self._scratch[j])                          # [B, KVH, S, Hd]
            c.execute()
            n = B * self.vocab_size
            cuda.d2h(self._logits, self._d_logits, n * self._logits.itemsize, c.stream)
            cuda.sync(c.stream)
        return self._logits[:n].reshape(B, self.vocab_size)

    # the arena's copies are queued on the context's stream, after the execution that wrote the scratch
    def _place(self, s, at, S):
        with self.c.lock:
            self.arena.ensure(int(self.lengths.max()), at + S)
            self.arena.place_from(s, at, self._scratch, S)

    def _scatter(self, P):
        with self.c.lock:
            self.arena.ensure(int(self.lengths.max()), int(P.max()) + 1)
            self.decode_copies += self.arena.scatter_from(P, self._scratch)

    def move(self, src: int, dst: int) -> None:
        with self.c.lock:
            super().move(src, dst)

    def _read_slot(self, s, n):
        with self.c.lock:
            return self.arena.read_slot(s, n, self._host)

    def _load_slot(self, s, arrays):
        with self.c.lock:
            self.arena.ensure(int(self.lengths.max()), max(arrays[0].shape[2], 1))
            self.arena.load_slot(s, arrays, self._host)

    def close(self) -> None:
        """Free this decoder's buffers and its share of the context (idempotent)."""
        cuda = self.__dict__.pop("cuda", None)
        if cuda is not None:
            try:
                cuda.sync(self.c.stream)
                cuda.release()
                if self.__dict__.pop("_holds_context", False):
                    self.c.release()
            except Exception:
                pass                        # interpreter shutdown or a dead context

    def __del__(self):
        self.close()


def _engine_record(manifest, name: str) -> dict:
    rec = manifest.engines.get(name)
    if not rec:
        raise BackendError(f"{manifest.root}: no TensorRT engine for '{name}'; build the engines on this device: "
                           f"safeclip-build --bundle {manifest.root}")
    if rec.get("file") not in manifest.files:
        raise BackendError(f"{manifest.root}: engine file '{rec.get('file')}' is not hashed in the manifest; "
                           f"rebuild with safeclip-build --bundle {manifest.root}")
    return rec
