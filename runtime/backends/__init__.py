"""Inference backends, one module each, behind two small interfaces.

* ``base.py``: what the generation loop and every backend share (``BackendError``, ``ContextError``,
  ``truncation``, the ``Decoder`` interface); standard library only. Tensor names and the KV layout are
  ``runtime/graph_spec.py``'s.
* ``ort.py``: ONNX Runtime (CPU always; CUDA / TensorRT execution providers with onnxruntime-gpu):
  ``OrtSession`` (``run(feeds) -> {name: array}``) and ``OrtDecoder``.
* ``trt.py``: native TensorRT plans (``TrtVisionSession``, ``TrtDecoder``); ``cuda.py`` its CUDA calls;
  ``trt_plan.py`` plan bookkeeping; ``trt_build.py`` the engine build steps ``safeclip-build`` runs.
* ``pick.py``: which backend runs a bundle here, and opening its graphs with it.
"""
from __future__ import annotations

from .base import BackendError, ContextError
from .ort import OrtSession, available_providers, make_session

__all__ = ["BackendError", "ContextError", "OrtSession", "available_providers", "make_session"]
