"""ONNX Runtime's IOBinding with a GPU provider's semantics for host inputs, on the CPU.

On the CPU provider ``IOBinding.bind_input(name, "cpu", ...)`` aliases the caller's buffer: a later in-place
edit of that buffer is what the next ``run_with_iobinding`` reads. On a GPU provider (CUDA, TensorRT EP) a
host input is copied to the device *when it is bound* (onnxruntime/core/session/IOBinding.cc,
``IOBinding::BindInput`` -> ``CopyOneInputAcrossDevices`` when the input's device differs from the session's),
so an in-place edit after binding is never seen: the run reads the stale bytes of bind time.

:func:`copy_at_bind` gives the CPU tests that GPU behaviour for the named host inputs (the decoder's embeddings,
mask and positions; the KV arena stays aliased, as device memory would be): the bytes are snapshotted when bound
and the run reads the snapshot. Code that binds once and then edits in place passes on the CPU and answers wrong
on a GPU; under this mode it answers wrong here too.
"""
from __future__ import annotations

import ctypes

import numpy as np


def copy_at_bind(monkeypatch, names) -> dict:
    """Patch ``IOBinding.bind_input``/``bind_cpu_input`` so host inputs in ``names`` are copied when bound.
    Returns counters ``{"snapshots": n}``."""
    from onnxruntime.capi.onnxruntime_inference_collection import IOBinding

    names, stats = set(names), {"snapshots": 0}
    real_bind, real_cpu = IOBinding.bind_input, IOBinding.bind_cpu_input

    def keep(self, name, arr):
        held = self.__dict__.setdefault("_copy_at_bind", {})
        held[name] = arr                                      # alive until rebound: what the "device" holds
        stats["snapshots"] += 1
        return arr

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        if device_type == "cpu" and name in names:
            dt = np.dtype(element_type)
            n = int(np.prod(shape)) * dt.itemsize
            snap = np.empty(max(n, 1), np.uint8)
            if n:
                ctypes.memmove(snap.ctypes.data, int(buffer_ptr), n)
            buffer_ptr = keep(self, name, snap).ctypes.data
        return real_bind(self, name, device_type, device_id, element_type, shape, buffer_ptr)

    def bind_cpu_input(self, name, arr_on_cpu):
        if name in names:
            arr_on_cpu = keep(self, name, np.array(arr_on_cpu, copy=True))
        return real_cpu(self, name, arr_on_cpu)

    monkeypatch.setattr(IOBinding, "bind_input", bind_input)
    monkeypatch.setattr(IOBinding, "bind_cpu_input", bind_cpu_input)
    return stats
