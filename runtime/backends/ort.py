"""ONNX Runtime sessions: CPU always; the CUDA execution provider when onnxruntime-gpu has it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..messages import one_line


class BackendError(RuntimeError):
    """A backend is unavailable or cannot load a graph."""


_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


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
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    n = threads or int(os.environ.get("SAFECLIP_THREADS", "0") or 0)
    if n:
        so.intra_op_num_threads = n
    try:
        sess = ort.InferenceSession(str(path), so, providers=[p for p in wanted if p in have])
    except Exception as e:
        raise BackendError(f"cannot load {Path(path).name}: {one_line(e)}") from None
    return OrtSession(sess, wanted[0])
