"""Inference backends behind one small interface: ``session.run(feeds) -> {name: array}``.

``onnxruntime`` (CPU, or CUDA / TensorRT execution providers with onnxruntime-gpu) is always available.
"""
from __future__ import annotations

from .ort import BackendError, OrtSession, available_providers, make_session

__all__ = ["BackendError", "OrtSession", "available_providers", "make_session"]
