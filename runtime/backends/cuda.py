"""The few CUDA runtime calls the TensorRT backend needs, through NVIDIA's cuda-python bindings (no torch).

Supported: ``cuda-python`` >= 12.6 (``from cuda.bindings import runtime``) and older releases
(``from cuda import cudart``); on Jetson, the release matching the JetPack's CUDA driver: cuda-python 12.x
(``pip install 'safeclip-edge[jetpack6]'``, ``cuda-python>=12.6,<13``) for JetPack 6.1/6.2 (CUDA 12.6),
13.x (``[jetpack7]``) for JetPack 7 (CUDA 13). cuda-python 13 links the CUDA 13 runtime, which a CUDA 12
driver cannot serve (CUDA's compatibility goes one way: a driver runs runtimes of its own major version or
older), so a plain ``pip install cuda-python`` on JetPack 6 gets a release whose every call fails with
``cudaErrorInsufficientDriver``. :meth:`CudaRuntime.check_versions` compares ``cudaRuntimeGetVersion``
(the runtime cuda-python links) with ``cudaDriverGetVersion`` (the newest CUDA the installed driver
serves; 0 without a driver) before any device fact is read, and raises :class:`CudaError` with one line
naming what to install; the backend choice (``pick.py``) and ``safeclip-build`` report it as it stands.
Every binding returns ``(cudaError_t, *results)``; :meth:`CudaRuntime.call` turns a non-zero error into
:class:`CudaError` with CUDA's own message.

Copies: ``h2d``/``d2h``/``d2d`` (``cudaMemcpyAsync``) and :meth:`CudaRuntime.copy2d` (``cudaMemcpy2DAsync``,
strided rows: the KV arena's per-head writes, ``arena.py``). Memory: :meth:`CudaRuntime.malloc` (device, ``cudaMalloc``: 256-byte aligned, as TensorRT's
``set_tensor_address`` requires) and :meth:`CudaRuntime.host_array` (page-locked host memory from
``cudaMallocHost`` viewed as a numpy array, so asynchronous copies really are asynchronous). Buffers are
freed by :meth:`CudaRuntime.release`. The import is lazy; without cuda-python the error carries the
install hint.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .base import BackendError

CUDA_HINT = ("cuda-python is not installed: `pip install cuda-python` (NVIDIA's CUDA bindings; on Jetson pick "
             "the release matching the JetPack's CUDA, e.g. cuda-python 12.6 for JetPack 6)")
ALIGN = 256                      # cudaMalloc alignment; TensorRT: "The pointer must have at least 256-byte alignment"

# What to install for a driver of each CUDA major version (pyproject extras of the same names).
CUDA_PYTHON_FOR_DRIVER = {12: ("cuda-python>=12.6,<13", "jetpack6", "JetPack 6.1/6.2"),
                          13: ("cuda-python>=13,<14", "jetpack7", "JetPack 7")}

__all__ = ["CudaError", "CudaRuntime", "import_cudart", "CUDA_HINT", "ALIGN", "round_up", "version_mismatch",
           "CUDA_PYTHON_FOR_DRIVER"]


class CudaError(BackendError):
    """cuda-python is missing, or a CUDA runtime call failed."""


def import_cudart():
    """The cuda-python runtime module (``cudart`` API names), or :class:`CudaError` with the install hint."""
    try:
        from cuda.bindings import runtime          # cuda-python >= 12.6
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart                    # older cuda-python
        return cudart
    except ImportError as e:
        raise CudaError(CUDA_HINT) from e


def _version(v: int) -> str:
    return f"{int(v) // 1000}.{int(v) % 1000 // 10}"                 # CUDA encodes 12.6 as 12060


def version_mismatch(driver: int, runtime: int) -> str | None:
    """Why cuda-python's CUDA runtime (``runtime``, as ``cudaRuntimeGetVersion`` gives it) cannot work with this
    driver (``driver``, as ``cudaDriverGetVersion``: 0 when none is installed), in one line; None when it can.
    A driver serves runtimes of its own major version or older (CUDA's backward compatibility; a newer minor
    release of the same major runs under CUDA's minor-version compatibility), never a newer major version."""
    driver, runtime = int(driver), int(runtime)
    if driver <= 0:
        return (f"no CUDA driver found (cuda-python links the CUDA {_version(runtime)} runtime): on Jetson install "
                "JetPack, elsewhere NVIDIA's driver")
    if runtime // 1000 <= driver // 1000:
        return None
    major = driver // 1000
    pin, extra, jetpack = CUDA_PYTHON_FOR_DRIVER.get(major, (f"cuda-python>={major},<{major + 1}", None, None))
    fix = f"pip install '{pin}'" + (f" (safeclip-edge[{extra}], {jetpack})" if extra else "")
    return (f"cuda-python links the CUDA {_version(runtime)} runtime but this machine's driver serves CUDA "
            f"{_version(driver)} at most: {fix}")


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-int(n) // to) * to


class CudaRuntime:
    """Error-checked wrappers around ``cudaMalloc``, ``cudaMallocHost``, ``cudaMemcpyAsync``, streams."""

    def __init__(self, rt=None):
        self.rt = rt if rt is not None else import_cudart()
        self._device: list[int] = []
        self._host: list[int] = []

    def call(self, fn: str, *args) -> Any:
        result = getattr(self.rt, fn)(*args)
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if int(err) != 0:
            _, msg = self.rt.cudaGetErrorString(err)
            msg = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
            raise CudaError(f"CUDA {fn} failed: {msg}")
        return rest[0] if len(rest) == 1 else (rest or None)

    # -- device facts ------------------------------------------------------------------------------------
    def check_versions(self) -> None:
        """Raise :class:`CudaError` (one line, what to install) when cuda-python's CUDA runtime is newer than the
        driver serves (:func:`version_mismatch`): a CUDA 13 cuda-python on JetPack 6's CUDA 12.6 driver."""
        runtime = int(self.call("cudaRuntimeGetVersion"))
        driver = int(self.call("cudaDriverGetVersion"))
        why = version_mismatch(driver, runtime)
        if why:
            raise CudaError(why)

    def device_facts(self, index: int = 0) -> dict[str, str]:
        """``{gpu_name, compute_capability, sm_count, memory_class_gib}`` of CUDA device ``index`` (after
        :meth:`check_versions`).

        Every Jetson Orin module calls its GPU "Orin" with compute capability 8.7, so the name alone would let
        a plan move between modules TensorRT tuned it apart for. The SM count (AGX Orin 64GB: 16, AGX Orin
        32GB: 14, Orin NX 16GB/8GB and Orin Nano 8GB: 8, Orin Nano 4GB: 4; NVIDIA's module data sheets, the
        table in ``runtime/devices.py``) and the memory class (the device's
        total memory rounded up to a power of two GiB: 64, 32, 16, 8, 4; what the kernel keeps back moves the
        exact figure between releases, the class stays) tell them apart. Orin NX 8GB and Orin Nano 8GB share
        both (8 SMs, 8 GiB) and differ in clocks, which a power mode changes, so they are not told apart."""
        self.check_versions()
        count = int(self.call("cudaGetDeviceCount"))
        if not 0 <= index < count:
            raise CudaError(f"CUDA device {index} not present ({count} found)")
        prop = self.call("cudaGetDeviceProperties", index)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        total = max(int(prop.totalGlobalMem), 1)
        return {"gpu_name": name.split("\x00")[0].strip(), "compute_capability": f"{int(prop.major)}.{int(prop.minor)}",
                "sm_count": str(int(prop.multiProcessorCount)),
                "memory_class_gib": str(1 << max(0, (-(-total // (1 << 30)) - 1).bit_length()))}

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device (``cudaMemGetInfo``; on a Jetson, the shared DRAM)."""
        free, total = self.call("cudaMemGetInfo")
        return int(free), int(total)

    # -- memory --------------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        """Device memory of at least ``nbytes`` (one aligned block for an empty request, so addresses are valid)."""
        ptr = int(self.call("cudaMalloc", max(int(nbytes), ALIGN)))
        self._device.append(ptr)
        return ptr

    def host_array(self, count: int, dtype) -> np.ndarray:
        """A page-locked host buffer of ``count`` elements as a numpy array (valid until :meth:`release`)."""
        dt = np.dtype(dtype)
        nbytes = max(int(count) * dt.itemsize, dt.itemsize)
        ptr = int(self.call("cudaMallocHost", nbytes))
        self._host.append(ptr)
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        return raw.view(dt)[: max(int(count), 1)]

    def release(self) -> None:
        """Free every buffer this object allocated (idempotent)."""
        while self._device:
            self.call("cudaFree", self._device.pop())
        while self._host:
            self.call("cudaFreeHost", self._host.pop())

    # -- streams and copies ----------------------------------------------------------------------------------
    def stream(self):
        return self.call("cudaStreamCreate")

    def destroy_stream(self, stream) -> None:
        self.call("cudaStreamDestroy", stream)

    def _kind(self, name: str):
        return getattr(self.rt.cudaMemcpyKind, name)          # looked up per copy: device facts need no copy enum

    def h2d(self, dst: int, src: np.ndarray | int, nbytes: int, stream) -> None:
        self.call("cudaMemcpyAsync", int(dst), _addr(src), int(nbytes), self._kind("cudaMemcpyHostToDevice"), stream)

    def d2h(self, dst: np.ndarray | int, src: int, nbytes: int, stream) -> None:
        self.call("cudaMemcpyAsync", _addr(dst), int(src), int(nbytes), self._kind("cudaMemcpyDeviceToHost"), stream)

    def d2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        self.call("cudaMemcpyAsync", int(dst), int(src), int(nbytes), self._kind("cudaMemcpyDeviceToDevice"), stream)

    def copy2d(self, dst: np.ndarray | int, dpitch: int, src: np.ndarray | int, spitch: int, width: int, height: int,
               kind: str, stream) -> None:
        """``height`` rows of ``width`` bytes, ``spitch`` apart at ``src`` and ``dpitch`` apart at ``dst``
        (``cudaMemcpy2DAsync``; ``kind`` names the ``cudaMemcpyKind``): one call for every head of a KV tensor."""
        self.call("cudaMemcpy2DAsync", _addr(dst), int(dpitch), _addr(src), int(spitch), int(width), int(height),
                  self._kind(kind), stream)

    def memset(self, dst: int, value: int, nbytes: int, stream) -> None:
        """``cudaMemsetAsync``: fresh device memory holds whatever bits were there (NaN and Inf included)."""
        self.call("cudaMemsetAsync", int(dst), int(value), int(nbytes), stream)

    def sync(self, stream) -> None:
        self.call("cudaStreamSynchronize", stream)


def _addr(x: np.ndarray | int) -> int:
    return int(x.ctypes.data) if isinstance(x, np.ndarray) else int(x)
