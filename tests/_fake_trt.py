"""One stand-in for ``tensorrt`` (runtime and builder) and cuda-python's runtime module, for testing the TensorRT
backend (``runtime/backends/trt.py``) and the engine builder (``runtime/backends/trt_build.py``) without a GPU.

Only names that exist in the real bindings are offered (``tests/test_trt_api_names.py`` checks every public
name here against name lists generated from the TensorRT 10.3 and 11.4 and cuda-python 12.6 and 13.0 wheels);
test-only hooks start with ``fake_`` (TensorRT side) or do not start with ``cuda`` (cuda-python side). What a
GPU does is enforced, so bugs that only a GPU would show fail here:

* **Stream order.** ``cudaMemcpyAsync`` and ``execute_async_v3`` are queued on their stream and take effect
  when the stream is synchronised (``cudaStreamSynchronize``; ``cudaFree``/``cudaFreeHost``/``cudaStreamDestroy``
  and ``cudaDeviceSynchronize`` finish all queued work, as CUDA does). A host read before the sync sees the old
  bytes; a host write before the sync is what a pending host-to-device copy uploads; work queued on another
  stream has not happened. Fresh allocations hold garbage (``0x7f`` bytes: NaN in float16), as real memory does.
* **Memory.** Every copy and binding must lie inside one allocation of the right kind (device memory from
  ``cudaMalloc``, page-locked host memory from ``cudaMallocHost``: the backend promises asynchronous copies);
  freed or unknown addresses fail. ``execute_async_v3`` refuses bindings where an output overlaps another bound
  tensor: on a GPU the kernels would overwrite what they still read (undefined results).
* **TensorRT's return values.** Where real TensorRT returns ``False`` or ``None`` (a shape outside the active
  profile, an output name given to ``set_input_shape``, an address that is not 256-byte aligned, an unknown
  tensor or profile, ``execute_async_v3`` with an unbound tensor or a missing input shape, a plan it cannot
  deserialize) the stand-in returns it too, so the callers' error paths run; ``fake_faults`` makes a named
  call fail the same way. ``nptype`` raises ``TypeError`` for types numpy lacks (bfloat16, fp8, int4), as the
  real one does. Switching profiles forgets the input shapes.
* ``execute_async_v3`` runs the plan's ONNX graph with ONNX Runtime on the bytes at the bound addresses and
  writes the outputs there; ``write_plan(..., perturb={output: delta})`` makes an engine differ from ONNX
  Runtime by ``delta`` (for the build's parity gate).

A fake runtime plan is JSON naming the ONNX file and the profiles (:func:`write_plan`); the fake builder
(``_fake_trt_build.py``) writes ``PLAN <flags>`` bytes, which the fake runtime (like the real one for a foreign file) cannot load.
"""
from __future__ import annotations

import ctypes
import enum
import json
import re
import types
from pathlib import Path

import numpy as np

GARBAGE = 0x7F                                  # what fresh memory holds here (fp16 0x7f7f is NaN)


class _PybindEnum(enum.IntEnum):
    def __str__(self):                          # pybind11 enums print as "DataType.BF16"
        return f"{type(self).__name__}.{self.name}"


Err = cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1,
                                                  "cudaErrorMemoryAllocation": 2,
                                                  "cudaErrorInsufficientDriver": 35,
                                                  "cudaErrorInvalidResourceHandle": 400})


class cudaStream_t:
    def __init__(self, n):
        self.n, self.synced, self.pending, self.destroyed = n, 0, [], False

    def __int__(self):
        return 0x5000 + self.n


class FakeCudart:
    """cuda.bindings.runtime look-alike backed by numpy buffers, with stream-ordered copies (module docstring)."""

    cudaError_t = cudaError_t
    cudaStream_t = cudaStream_t

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = range(4)

    def __init__(self, gpu=(b"Orin\x00", 8, 7), limit_bytes=None, sm_count=16, total_bytes=64 << 30,
                 versions=(12060, 12060)):
        self.blocks: dict[int, tuple[np.ndarray, int, str]] = {}
        self.gpu, self.limit = gpu, limit_bytes
        self.sm_count, self.total_bytes = sm_count, total_bytes     # an AGX Orin 64GB by default
        self.versions = versions          # (driver, runtime) as CUDA encodes them: JetPack 6's 12.6 by default
        self.mallocs = self.frees = self.copies = 0
        self.streams: list[cudaStream_t] = []
        self.reserved: dict[int, int] = {}             # TensorRT's own device memory (weights, activations): token -> bytes
        self._tokens = 0
        self.peak = 0                                  # most device + reserved bytes held at once

    def used(self) -> int:
        return sum(b[1] for b in self.blocks.values()) + sum(self.reserved.values())

    def reserve(self, n) -> int | None:
        """TensorRT's own device memory (an engine's weights, a context's activations): counted against the limit
        like cudaMalloc'd blocks, never read or written by copies; None when it does not fit (out of memory)."""
        n = int(n)
        if self.limit is not None and self.used() + n > self.limit:
            return None
        self._tokens += 1
        token = 0x7000_0000_0000 + 256 * self._tokens                # never a cudaMalloc'd address
        self.reserved[token] = n
        self.peak = max(self.peak, self.used())
        return token

    def unreserve(self, token) -> None:
        self.reserved.pop(token, None)

    # memory
    def _alloc(self, n, kind):
        if self.limit is not None and self.used() + n > self.limit:
            return (Err.cudaErrorMemoryAllocation, 0)
        buf = np.full(n + 256, GARBAGE, np.uint8)
        addr = -(-buf.ctypes.data // 256) * 256
        self.blocks[addr] = (buf, n, kind)
        self.mallocs += 1
        self.peak = max(self.peak, self.used())
        return (Err.cudaSuccess, addr)

    def cudaMalloc(self, size):
        return self._alloc(int(size), "device")

    def cudaMallocHost(self, size):
        return self._alloc(int(size), "host")

    def _free(self, ptr, kind):
        self.cudaDeviceSynchronize()                   # cudaFree waits for the device, as CUDA's does
        b = self.blocks.get(int(ptr))
        if b is None or b[2] != kind:
            return (Err.cudaErrorInvalidValue,)
        del self.blocks[int(ptr)]
        self.frees += 1
        return (Err.cudaSuccess,)

    def cudaFree(self, devPtr):
        return self._free(devPtr, "device")

    def cudaFreeHost(self, ptr):
        return self._free(ptr, "host")

    def region(self, ptr, n, kind=None):
        """The allocation holding [ptr, ptr+n), or AssertionError."""
        for base, (_, size, k) in self.blocks.items():
            if base <= ptr and ptr + n <= base + size and (kind is None or k == kind):
                return base
        what = {"device": "device (cudaMalloc)", "host": "page-locked host (cudaMallocHost)"}.get(kind, "any")
        raise AssertionError(f"{n} bytes at {ptr:#x} are not inside one {what} allocation")

    # streams and copies
    def stream(self, handle) -> cudaStream_t:
        """The live stream whose handle is ``handle`` (an int or a stream), or None."""
        for s in self.streams:
            if int(s) == int(handle) and not s.destroyed:
                return s
        return None

    def cudaStreamCreate(self):
        self.streams.append(cudaStream_t(len(self.streams)))
        return (Err.cudaSuccess, self.streams[-1])

    def _drain(self, s):
        while s.pending:
            s.pending.pop(0)()

    def cudaStreamDestroy(self, stream):
        if not isinstance(stream, cudaStream_t) or stream.destroyed:
            return (Err.cudaErrorInvalidResourceHandle,)
        self._drain(stream)                             # queued work still completes
        stream.destroyed = True
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        if not isinstance(stream, cudaStream_t) or stream.destroyed:
            return (Err.cudaErrorInvalidResourceHandle,)
        self._drain(stream)
        stream.synced += 1
        return (Err.cudaSuccess,)

    def cudaDeviceSynchronize(self):
        for s in self.streams:
            self._drain(s)
        return (Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if not isinstance(stream, cudaStream_t) or stream.destroyed:
            return (Err.cudaErrorInvalidResourceHandle,)
        K, n = self.cudaMemcpyKind, int(count)
        sides = {K.cudaMemcpyHostToDevice: ("device", "host"), K.cudaMemcpyDeviceToHost: ("host", "device"),
                 K.cudaMemcpyDeviceToDevice: ("device", "device"), K.cudaMemcpyHostToHost: ("host", "host")}
        if kind not in sides:
            return (Err.cudaErrorInvalidValue,)
        self.region(int(dst), n, sides[kind][0])
        self.region(int(src), n, sides[kind][1])
        self.enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), n))   # bytes move in stream order
        self.copies += 1
        return (Err.cudaSuccess,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        if not isinstance(stream, cudaStream_t) or stream.destroyed:
            return (Err.cudaErrorInvalidResourceHandle,)
        K, w, h = self.cudaMemcpyKind, int(width), int(height)
        sides = {K.cudaMemcpyHostToDevice: ("device", "host"), K.cudaMemcpyDeviceToHost: ("host", "device"),
                 K.cudaMemcpyDeviceToDevice: ("device", "device"), K.cudaMemcpyHostToHost: ("host", "host")}
        if kind not in sides or w > int(dpitch) or w > int(spitch):
            return (Err.cudaErrorInvalidValue,)                  # CUDA: width may not exceed either pitch
        rows = [(int(dst) + r * int(dpitch), int(src) + r * int(spitch)) for r in range(h)]
        for d, s in rows:                                        # every row inside one allocation of its kind
            self.region(d, w, sides[kind][0])
            self.region(s, w, sides[kind][1])
        self.enqueue(stream, lambda: [ctypes.memmove(d, s, w) for d, s in rows])
        self.copies += 1
        return (Err.cudaSuccess,)

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        if not isinstance(stream, cudaStream_t) or stream.destroyed:
            return (Err.cudaErrorInvalidResourceHandle,)
        self.region(int(devPtr), int(count), "device")
        self.enqueue(stream, lambda: ctypes.memset(int(devPtr), int(value), int(count)))
        return (Err.cudaSuccess,)

    def enqueue(self, stream, op) -> None:
        stream.pending.append(op)

    def read(self, addr, n) -> bytes:                  # the stand-in engine's view of device memory
        return bytes((ctypes.c_uint8 * n).from_address(int(addr)))

    def write(self, addr, data: bytes) -> None:
        ctypes.memmove(int(addr), data, len(data))

    # device facts
    def cudaMemGetInfo(self):
        total = self.limit if self.limit is not None else 8 << 30  # the limit counts every block and reservation
        return Err.cudaSuccess, max(0, total - self.used()), total

    def cudaGetDeviceCount(self):
        if self.versions[1] // 1000 > self.versions[0] // 1000:
            return (Err.cudaErrorInsufficientDriver, 0)          # what a newer-major runtime gets from every call
        return (Err.cudaSuccess, 1)

    def cudaDriverGetVersion(self):                              # the newest CUDA the driver serves (0: none)
        return (Err.cudaSuccess, self.versions[0])

    def cudaRuntimeGetVersion(self):                             # the runtime these bindings link
        return (Err.cudaSuccess, self.versions[1])

    def cudaGetDeviceProperties(self, device):
        name, major, minor = self.gpu
        return (Err.cudaSuccess, types.SimpleNamespace(name=name, major=major, minor=minor,
                                                       multiProcessorCount=self.sm_count,
                                                       totalGlobalMem=self.total_bytes))

    def cudaGetErrorString(self, error):
        msgs = {1: b"invalid argument", 2: b"out of memory", 400: b"invalid resource handle",
                35: b"CUDA driver version is insufficient for CUDA runtime version"}
        return (Err.cudaSuccess, msgs.get(int(error), b"unknown error"))


class RealCudaBacking:
    """Backs the stand-in engine with real device memory through a cuda-python runtime module ``rt``: what
    ``scripts/device_check.sh`` uses on a lent GPU (no TensorRT there) to drive the TensorRT backend's real
    cuda-python paths (``cudaMalloc``'d buffers, streams, async and 2-D copies, pinned staging) with the graph
    executed by ONNX Runtime. An execution waits for the device (``cudaDeviceSynchronize``: every queued copy
    has landed), reads its bound inputs to the host, runs, and writes its outputs back before it returns, so
    work the backend queues after it sees them. Only calls FakeCudart also has are made, so the tests run this
    adapter over FakeCudart too (whose checks then apply to the adapter's own copies)."""

    def __init__(self, rt):
        self.rt = rt
        self._stream = self._ok(rt.cudaStreamCreate())

    @staticmethod
    def _ok(res):
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if int(err) != 0:
            raise RuntimeError(f"CUDA call failed in the stand-in's backing: error {int(err)}")
        return rest[0] if len(rest) == 1 else rest

    def stream(self, handle):
        return handle

    def region(self, ptr, n, kind=None):
        return ptr                                   # the real driver faults on a bad address

    def enqueue(self, stream, op) -> None:
        self._ok(self.rt.cudaDeviceSynchronize())
        op()

    def _copy(self, dst, src, n, kind):
        K = self.rt.cudaMemcpyKind
        self._ok(self.rt.cudaMemcpyAsync(dst, src, n, getattr(K, kind), self._stream))
        self._ok(self.rt.cudaStreamSynchronize(self._stream))

    def _pinned(self, n):
        ptr = int(self._ok(self.rt.cudaMallocHost(max(n, 1))))
        return ptr, np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (max(n, 1),))

    def read(self, addr, n) -> bytes:
        ptr, host = self._pinned(n)
        try:
            self._copy(ptr, int(addr), n, "cudaMemcpyDeviceToHost")
            return host[:n].tobytes()
        finally:
            self._ok(self.rt.cudaFreeHost(ptr))

    def write(self, addr, data: bytes) -> None:
        ptr, host = self._pinned(len(data))
        try:
            host[: len(data)] = np.frombuffer(data, np.uint8)
            self._copy(int(addr), ptr, len(data), "cudaMemcpyHostToDevice")
        finally:
            self._ok(self.rt.cudaFreeHost(ptr))


def install_fakes(monkeypatch, version: str = "10.3.0.30", **cudart_kw):
    """Put the stand-ins in ``sys.modules`` as ``tensorrt`` and ``cuda.bindings.runtime`` (a JetPack 6 Orin by
    default); returns ``(trt, cudart)``."""
    import sys

    rt = FakeCudart(**cudart_kw)
    trt = fake_tensorrt(rt, version)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = rt, bindings
    for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, mod)
    return trt, rt


def write_plan(onnx_path, plan_path, profiles, perturb=None, activation_bytes=None, weights_bytes=None) -> Path:
    """A fake plan: JSON naming the ONNX graph and the optimization profiles; ``perturb`` {output: delta}.
    ``activation_bytes`` (one per profile) and ``weights_bytes`` default to what the graph makes of them
    (:func:`plan_memory`)."""
    spec = {"onnx": str(Path(onnx_path).resolve()), "profiles": profiles, "perturb": dict(perturb or {})}
    if activation_bytes is not None:
        spec["activation_bytes"] = [int(b) for b in activation_bytes]
    if weights_bytes is not None:
        spec["weights_bytes"] = int(weights_bytes)
    Path(plan_path).write_text(json.dumps(spec))
    return Path(plan_path)


_MEMORY: dict = {}


def plan_memory(onnx_path, profiles) -> tuple[list[int], int]:
    """(context memory per profile, weight bytes) of a graph: the stand-in's model of what TensorRT allocates on
    the device (``_fake_trt_shapes``: live intermediates at each profile's max shapes, and every initializer's and
    constant's bytes). Cached per graph file and profiles."""
    from _fake_trt_shapes import activation_bytes, weights_bytes

    path = Path(onnx_path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, json.dumps(profiles, sort_keys=True))
    if key not in _MEMORY:
        _MEMORY[key] = ([activation_bytes(path, p) for p in (profiles or [{}])], weights_bytes(path))
    return _MEMORY[key]


def fake_tensorrt(cudart: FakeCudart | None = None, version: str = "10.3.0.30", build_fails: bool = False):
    """The stand-in ``tensorrt`` module of ``version`` (10.x or 11.x); ``cudart`` backs execution."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    stats = {"contexts": 0, "executions": 0, "profile_switches": 0, "deserialized": 0, "context_memory": 0}
    trt.fake_stats, trt.fake_faults = stats, set()          # e.g. {"execute_async_v3"}: that call fails

    def fails(name):
        return name in trt.fake_faults

    trt.TensorIOMode = _PybindEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = _PybindEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
                                             "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9})
    D = trt.DataType
    to_np = {D.FLOAT: np.float32, D.HALF: np.float16, D.INT8: np.int8, D.INT32: np.int32, D.INT64: np.int64,
             D.BOOL: np.bool_, D.UINT8: np.uint8}
    from_onnx = {1: D.FLOAT, 10: D.HALF, 7: D.INT64, 6: D.INT32, 9: D.BOOL, 3: D.INT8, 2: D.UINT8, 16: D.BF16}

    def nptype(dt):                                           # tensorrt/__init__.py, 10.3 and 11.4 alike
        if dt in to_np:
            return to_np[dt]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    trt.nptype = nptype

    class ILogger:                                            # subclassed by the builder's logger
        class Severity(_PybindEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=ILogger.Severity.WARNING):
            pass

        def log(self, severity, msg):
            pass

    class IProgressMonitor:                                   # subclassed by the builder's progress report
        pass

    trt.ILogger, trt.Logger, trt.IProgressMonitor = ILogger, Logger, IProgressMonitor
    # NvInferRuntime.h (10.3 and 11.x): kSTATIC = 0, kON_PROFILE_CHANGE = 1, kUSER_MANAGED = 2
    trt.ExecutionContextAllocationStrategy = Strategy = _PybindEnum(
        "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2})
    reserve = getattr(cudart, "reserve", lambda n: 0)          # RealCudaBacking: no accounting on a real GPU
    unreserve = getattr(cudart, "unreserve", lambda token: None)

    # -- runtime -----------------------------------------------------------------------------------------
    class ICudaEngine:
        def __init__(self, spec):
            import onnx

            model = onnx.load(spec["onnx"], load_external_data=False)
            self._onnx, self._ort = spec["onnx"], None              # ONNX Runtime session, made on first use
            self._profiles, self._perturb = spec["profiles"], spec.get("perturb") or {}
            act, weights = plan_memory(spec["onnx"], self._profiles) \
                if "activation_bytes" not in spec or "weights_bytes" not in spec else (None, None)
            self._act = [int(b) for b in spec.get("activation_bytes", act)]
            self._weights = int(spec.get("weights_bytes", weights))
            self._tensors = {}                                  # name -> (mode, dtype, dims as ints or symbols)
            io = ((trt.TensorIOMode.INPUT, model.graph.input), (trt.TensorIOMode.OUTPUT, model.graph.output))
            for mode, vis in io:
                for vi in vis:
                    tt = vi.type.tensor_type
                    dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
                    self._tensors[vi.name] = (mode, from_onnx[tt.elem_type], dims)
            self._names = list(self._tensors)

        num_io_tensors = property(lambda self: len(self._names))
        num_optimization_profiles = property(lambda self: max(1, len(self._profiles)))

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_mode(self, name):
            return self._tensors[name][0] if name in self._tensors else trt.TensorIOMode.NONE

        def get_tensor_dtype(self, name):
            return self._tensors[name][1]

        def get_tensor_shape(self, name):
            return [d if isinstance(d, int) else -1 for d in self._tensors[name][2]]

        def get_tensor_profile_shape(self, name, profile_index):
            p = self._profiles[profile_index][name]
            return [list(p["min"]), list(p["opt"]), list(p["max"])]

        # context memory (NvInferRuntime.h): per profile, and the maximum over all (what kSTATIC allocates)
        def get_device_memory_size_for_profile_v2(self, profile_index):
            return self._act[profile_index]

        device_memory_size_v2 = property(lambda self: max(self._act))

        def create_execution_context(self, strategy=Strategy.STATIC):
            if fails("create_execution_context"):
                return None                                     # TensorRT: out of device memory
            need = {Strategy.STATIC: self.device_memory_size_v2, Strategy.ON_PROFILE_CHANGE: self._act[0],
                    Strategy.USER_MANAGED: 0}[Strategy(int(strategy))]
            token = reserve(need)
            if token is None:
                return None                                     # the bindings return None when the C++ call fails
            stats["contexts"] += 1
            return IExecutionContext(self, Strategy(int(strategy)), token, need)

        def __del__(self):
            unreserve(getattr(self, "_token", None))

    class IExecutionContext:
        def __init__(self, engine, strategy, token, held):
            self._e, self._profile, self._shapes, self._addr = engine, 0, {}, {}
            self._strategy, self._token, self._held = strategy, token, held      # context memory held now
            self._user_mem = None                                               # USER_MANAGED: (address, size)
            stats["context_memory"] = held

        def set_optimization_profile_async(self, profile_index, stream_handle):
            # pyCore.cpp (10.3 to 11.1): PY_ASSERT_RUNTIME_ERROR(setOptimizationProfileAsync(...), "Error in set
            # optimization profile async."): a failure raises RuntimeError; it never returns False
            k = profile_index
            if fails("set_optimization_profile_async") or not 0 <= k < len(self._e._profiles) or \
                    cudart.stream(stream_handle) is None:
                raise RuntimeError("Error in set optimization profile async.")
            if self._strategy == Strategy.ON_PROFILE_CHANGE and k != self._profile:
                unreserve(self._token)                           # "reallocate for a profile when it's selected"
                self._token, self._held = reserve(self._e._act[k]), self._e._act[k]
                stats["context_memory"] = self._held
                if self._token is None:
                    self._held = 0
                    raise RuntimeError("Error in set optimization profile async.")
            self._profile, self._shapes = k, {}                # switching invalidates the input shapes
            stats["profile_switches"] += 1
            return True

        def update_device_memory_size_for_shapes(self):
            return self._e._act[self._profile]                 # the stand-in sizes a profile by its max shapes

        def set_device_memory(self, memory, size):
            if self._strategy != Strategy.USER_MANAGED:
                raise RuntimeError("set_device_memory needs a context created with USER_MANAGED")
            cudart.region(int(memory), max(int(size), 1), "device")
            self._user_mem = (int(memory), int(size))

        def __del__(self):
            unreserve(getattr(self, "_token", None))
            stats["context_memory"] = 0

        def set_input_shape(self, name, shape):
            n = name
            if fails("set_input_shape") or self._e.get_tensor_mode(n) != trt.TensorIOMode.INPUT:
                return False                                     # an output or unknown name
            dims = self._e._tensors[n][2]
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                return False
            if self._e._profiles:
                p = self._e._profiles[self._profile][n]
                if not all(a <= s <= b for a, s, b in zip(p["min"], shape, p["max"])):
                    return False                                 # outside the active profile
            self._shapes[n] = shape
            return True

        def set_tensor_address(self, name, memory):
            if fails("set_tensor_address") or name not in self._e._tensors or int(memory) % 256:
                return False                                     # TensorRT: 256-byte alignment required
            self._addr[name] = int(memory)
            return True

        def _symbols(self):
            sym = {}
            for n, (mode, _, dims) in self._e._tensors.items():
                if mode == trt.TensorIOMode.INPUT and n in self._shapes:
                    sym.update({d: s for d, s in zip(dims, self._shapes[n]) if isinstance(d, str)})
            return sym

        def get_tensor_shape(self, name):
            mode, _, dims = self._e._tensors[name]
            if mode == trt.TensorIOMode.INPUT:
                return list(self._shapes.get(name, [-1] * len(dims)))
            sym, out = self._symbols(), []
            for d in dims:
                if isinstance(d, int):
                    out.append(d)
                else:
                    expr = re.sub(r"[A-Za-z_][A-Za-z_0-9]*", lambda m: str(sym.get(m.group(0), -10 ** 9)), d)
                    v = int(eval(expr, {"__builtins__": {}}))   # "seq + past" and the like
                    out.append(v if v >= 0 else -1)
            return out

        def execute_async_v3(self, stream_handle):
            stream = cudart.stream(stream_handle)
            tensors = self._e._tensors
            if fails("execute_async_v3") or stream is None or any(n not in self._addr for n in tensors) or \
                    any(n not in self._shapes for n, t in tensors.items() if t[0] == trt.TensorIOMode.INPUT):
                return False                                     # TensorRT logs the missing binding
            if self._strategy == Strategy.USER_MANAGED and (self._user_mem is None or
                                                            self._user_mem[1] < self._e._act[self._profile]):
                return False                                     # no (or too little) user-managed context memory
            named = {}                                           # NvInfer.h ITensor::setDimensionName: "Dimensions
            for n, (mode, _, dims) in tensors.items():           # with the same non-empty name must be equal at
                if mode == trt.TensorIOMode.INPUT:               # runtime" (onnx-tensorrt names them by dim_param)
                    for d, v in zip(dims, self._shapes[n]):
                        if isinstance(d, str) and named.setdefault(d, v) != v:
                            return False
            spans = {}                                           # name -> (address, bytes, shape, numpy dtype)
            for n, (mode, dt, _) in tensors.items():
                shape = self.get_tensor_shape(n)
                nbytes = int(np.prod(shape)) * np.dtype(to_np[dt]).itemsize
                cudart.region(self._addr[n], max(nbytes, 1), "device")
                spans[n] = (self._addr[n], nbytes, tuple(shape), np.dtype(to_np[dt]))
            for o, (a, size, _, _) in spans.items():
                if tensors[o][0] != trt.TensorIOMode.OUTPUT or not size:
                    continue
                for n, (b, other, _, _) in spans.items():
                    if n != o and other and a < b + other and b < a + size:
                        raise AssertionError(f"execute_async_v3: output '{o}' [{a:#x}, +{size}) overlaps '{n}' "
                                             f"[{b:#x}, +{other}): on a GPU the kernels would overwrite what they read")
            engine = self._e
            cudart.enqueue(stream, lambda: _run(engine, spans))
            stats["executions"] += 1
            return True

    def _run(engine, spans):
        """The queued execution: read the inputs where they are bound now, write the outputs."""
        feeds, outs = {}, [n for n, t in engine._tensors.items() if t[0] == trt.TensorIOMode.OUTPUT]
        for n in engine._tensors:
            addr, nbytes, shape, dt = spans[n]
            if n not in outs:
                feeds[n] = np.frombuffer(cudart.read(addr, nbytes) if nbytes else b"", dt).reshape(shape).copy()
        if engine._ort is None:
            import onnxruntime as ort
            engine._ort = ort.InferenceSession(engine._onnx, providers=["CPUExecutionProvider"])
        for n, value in zip(outs, engine._ort.run(outs, feeds)):
            addr, nbytes, shape, dt = spans[n]
            assert tuple(value.shape) == shape, (n, value.shape, shape)
            value = value + engine._perturb[n] if n in engine._perturb else value
            data = np.ascontiguousarray(value, dt).tobytes()
            if data:
                cudart.write(addr, data)

    class Runtime:
        def __init__(self, logger):
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            try:
                spec = json.loads(bytes(memoryview(serialized_engine)).decode())
            except (UnicodeDecodeError, ValueError):
                return None                                       # TensorRT logs "Serialization assertion failed"
            engine = ICudaEngine(spec)
            engine._token = reserve(engine._weights)             # the engine's weights live in device memory
            if engine._token is None:
                return None                                       # TensorRT logs the failed allocation
            stats["deserialized"] += 1
            return engine

    trt.Runtime, trt.ICudaEngine, trt.IExecutionContext = Runtime, ICudaEngine, IExecutionContext
    from _fake_trt_build import builder_api

    builder_api(trt, version, major, build_fails, cudart)
    return trt
