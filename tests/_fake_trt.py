"""Stand-ins for ``tensorrt`` and cuda-python's runtime module, for testing the TensorRT backend without a GPU.

They mimic the API names the backend uses (TensorRT 10/11 ``Runtime``, ``ICudaEngine``,
``IExecutionContext``; cuda-python ``cudaMalloc``, ``cudaMallocHost``, ``cudaMemcpyAsync``, streams) and they
*enforce* what the real ones require, so the backend's bookkeeping is really exercised:

* "device" memory is host memory handed out 256-byte aligned; every copy is checked to stay inside one
  allocation of the right kind (device vs host), and freed or unknown addresses fail;
* a context rejects input shapes outside its active profile's [min, max] (as ``set_input_shape`` returns
  False), forgets shapes when the profile switches, rejects unaligned tensor addresses, and refuses to
  execute with an unbound tensor or a buffer smaller than the tensor;
* ``execute_async_v3`` runs the plan's ONNX graph with ONNX Runtime on the bytes at the bound addresses and
  writes the outputs to the bound output addresses.

A fake plan is JSON naming the ONNX file and the profiles (:func:`write_plan`).
"""
from __future__ import annotations

import ctypes
import enum
import json
import re
import types
from pathlib import Path

import numpy as np

ONNX_TO_NP = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 9: np.bool_}


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class Stream:
    def __init__(self, n):
        self.n, self.synced = n, 0

    def __int__(self):
        return 0x5000 + self.n


class FakeCudart:
    """cuda.bindings.runtime look-alike backed by numpy buffers."""

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = range(4)

    def __init__(self, gpu=(b"Orin\x00", 8, 7), limit_bytes=None):
        self.blocks: dict[int, tuple[np.ndarray, int, str]] = {}
        self.gpu, self.limit = gpu, limit_bytes
        self.mallocs = self.frees = self.copies = 0
        self.streams: list[Stream] = []

    # memory
    def _alloc(self, n, kind):
        if self.limit is not None and sum(b[1] for b in self.blocks.values()) + n > self.limit:
            return (Err.cudaErrorMemoryAllocation, 0)
        buf = np.zeros(n + 256, np.uint8)
        addr = -(-buf.ctypes.data // 256) * 256
        self.blocks[addr] = (buf, n, kind)
        self.mallocs += 1
        return (Err.cudaSuccess, addr)

    def cudaMalloc(self, n):
        return self._alloc(int(n), "device")

    def cudaMallocHost(self, n):
        return self._alloc(int(n), "host")

    def _free(self, ptr, kind):
        b = self.blocks.get(int(ptr))
        if b is None or b[2] != kind:
            return (Err.cudaErrorInvalidValue,)
        del self.blocks[int(ptr)]
        self.frees += 1
        return (Err.cudaSuccess,)

    def cudaFree(self, ptr):
        return self._free(ptr, "device")

    def cudaFreeHost(self, ptr):
        return self._free(ptr, "host")

    def region(self, ptr, n, kind=None):
        """The allocation holding [ptr, ptr+n), or AssertionError."""
        for base, (_, size, k) in self.blocks.items():
            if base <= ptr and ptr + n <= base + size and (kind is None or k == kind):
                return base
        raise AssertionError(f"{n} bytes at {ptr:#x} are not inside one {kind or 'any'} allocation")

    # streams and copies
    def cudaStreamCreate(self):
        self.streams.append(Stream(len(self.streams)))
        return (Err.cudaSuccess, self.streams[-1])

    def cudaStreamDestroy(self, s):
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, s):
        s.synced += 1
        return (Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert isinstance(stream, Stream)
        K = self.cudaMemcpyKind
        if kind in (K.cudaMemcpyHostToDevice, K.cudaMemcpyDeviceToDevice):
            self.region(dst, n, "device")
        if kind in (K.cudaMemcpyDeviceToHost, K.cudaMemcpyDeviceToDevice):
            self.region(src, n, "device")
        if kind == K.cudaMemcpyHostToDevice and any(b <= src < b + s for b, (_, s, k) in self.blocks.items() if k == "device"):
            raise AssertionError("host-to-device copy from device memory")
        ctypes.memmove(int(dst), int(src), int(n))
        self.copies += 1
        return (Err.cudaSuccess,)

    # device facts
    def cudaGetDeviceCount(self):
        return (Err.cudaSuccess, 1)

    def cudaGetDeviceProperties(self, i):
        name, major, minor = self.gpu
        return (Err.cudaSuccess, types.SimpleNamespace(name=name, major=major, minor=minor))

    def cudaGetErrorString(self, err):
        return (Err.cudaSuccess, {1: b"invalid argument", 2: b"out of memory"}.get(int(err), b"unknown error"))


def write_plan(onnx_path, plan_path, profiles) -> Path:
    """A fake plan: JSON naming the ONNX graph and the optimization profiles."""
    Path(plan_path).write_text(json.dumps({"onnx": str(Path(onnx_path).resolve()), "profiles": profiles}))
    return Path(plan_path)


def fake_tensorrt(cudart: FakeCudart, version: str = "10.3.0.30"):
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "INT64": 8})
    to_np = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
             trt.DataType.INT64: np.int64, trt.DataType.BOOL: np.bool_}
    from_onnx = {1: trt.DataType.FLOAT, 10: trt.DataType.HALF, 7: trt.DataType.INT64, 6: trt.DataType.INT32,
                 9: trt.DataType.BOOL}
    trt.nptype = lambda dt: to_np[dt]
    stats = {"contexts": 0, "executions": 0, "profile_switches": 0, "deserialized": 0}
    trt.stats = stats

    class Logger:
        WARNING = 2

        def __init__(self, level=2):
            self.level = level

    class Engine:
        def __init__(self, spec):
            model = onnx.load(spec["onnx"], load_external_data=False)
            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.profiles = spec["profiles"]
            self.tensors = {}                                   # name -> (mode, dtype, dims as ints or symbol strings)
            for mode, vis in ((trt.TensorIOMode.INPUT, model.graph.input), (trt.TensorIOMode.OUTPUT, model.graph.output)):
                for vi in vis:
                    tt = vi.type.tensor_type
                    dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
                    self.tensors[vi.name] = (mode, from_onnx[tt.elem_type], dims)
            self.names = list(self.tensors)

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = property(lambda self: max(1, len(self.profiles)))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, n):
            return self.tensors[n][0]

        def get_tensor_dtype(self, n):
            return self.tensors[n][1]

        def get_tensor_shape(self, n):
            return [d if isinstance(d, int) else -1 for d in self.tensors[n][2]]

        def get_tensor_profile_shape(self, n, k):
            p = self.profiles[k][n]
            return [list(p["min"]), list(p["opt"]), list(p["max"])]

        def create_execution_context(self):
            stats["contexts"] += 1
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.e, self.profile, self.shapes, self.addr = engine, 0, {}, {}

        def set_optimization_profile_async(self, k, stream):
            assert isinstance(stream, int) and 0 <= k < len(self.e.profiles)
            self.profile, self.shapes = k, {}                  # switching invalidates the input shapes
            stats["profile_switches"] += 1
            return True

        def set_input_shape(self, n, shape):
            mode, _, dims = self.e.tensors[n]
            assert mode == trt.TensorIOMode.INPUT
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                return False
            if self.e.profiles:
                p = self.e.profiles[self.profile][n]
                if not all(a <= s <= b for a, s, b in zip(p["min"], shape, p["max"])):
                    return False                                 # TensorRT: shape outside the active profile
            self.shapes[n] = shape
            return True

        def set_tensor_address(self, n, ptr):
            assert n in self.e.tensors and isinstance(ptr, int)
            assert ptr % 256 == 0, f"address of {n} is not 256-byte aligned"
            self.addr[n] = ptr
            return True

        def _symbols(self):
            sym = {}
            for n, (mode, _, dims) in self.e.tensors.items():
                if mode == trt.TensorIOMode.INPUT and n in self.shapes:
                    sym.update({d: s for d, s in zip(dims, self.shapes[n]) if isinstance(d, str)})
            return sym

        def get_tensor_shape(self, n):
            mode, _, dims = self.e.tensors[n]
            if mode == trt.TensorIOMode.INPUT:
                return list(self.shapes.get(n, [-1] * len(dims)))
            sym = self._symbols()
            out = []
            for d in dims:
                if isinstance(d, int):
                    out.append(d)
                else:
                    expr = re.sub(r"[A-Za-z_][A-Za-z_0-9]*", lambda m: str(sym.get(m.group(0), -10 ** 9)), d)
                    v = int(eval(expr, {"__builtins__": {}}))   # "seq + past" and the like
                    out.append(v if v >= 0 else -1)
            return out

        def execute_async_v3(self, stream):
            assert isinstance(stream, int)
            feeds = {}
            for n, (mode, dt, dims) in self.e.tensors.items():
                assert n in self.addr, f"tensor {n} has no address"
                if mode != trt.TensorIOMode.INPUT:
                    continue
                assert n in self.shapes, f"input {n} has no shape"
                shape, np_t = self.shapes[n], np.dtype(to_np[dt])
                nbytes = int(np.prod(shape)) * np_t.itemsize
                cudart.region(self.addr[n], max(nbytes, 1), "device")
                raw = (ctypes.c_uint8 * nbytes).from_address(self.addr[n]) if nbytes else b""
                feeds[n] = np.frombuffer(bytes(raw), np_t).reshape(shape).copy()
            names = [n for n, (m, _, _) in self.e.tensors.items() if m == trt.TensorIOMode.OUTPUT]
            for n, value in zip(names, self.e.session.run(names, feeds)):
                assert list(value.shape) == self.get_tensor_shape(n), (n, value.shape, self.get_tensor_shape(n))
                data = np.ascontiguousarray(value, to_np[self.e.tensors[n][1]]).tobytes()
                cudart.region(self.addr[n], max(len(data), 1), "device")
                ctypes.memmove(self.addr[n], data, len(data))
            stats["executions"] += 1
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, buf):
            stats["deserialized"] += 1
            return Engine(json.loads(bytes(memoryview(buf)).decode()))

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt
