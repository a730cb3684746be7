"""Benchmark helpers for the ONNX Runtime decoder: what one decode step costs, and where the time goes.

Used by ``bench_generate.py`` (BENCHMARKS.md). Not part of the runtime: it reaches into
``OrtDecoder``'s arenas and binding step to time them apart, which only a benchmark should do.
Supported: CPU arenas only (on a GPU the copies are device-side; time whole steps there instead).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from safeclip.runtime.backends.base import ContextError
from safeclip.runtime.backends.ort import OrtDecoder

__all__ = ["best_of", "kv_update_costs"]


def best_of(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kv_update_costs(decoder: OrtDecoder, lengths: Sequence[int] = (0, 256, 1024), repeats: int = 5) -> dict:
    """Per decode step at each cache length P: the step, its cache update, and a weight-read estimate.

    Returns lists aligned with ``lengths`` (seconds, best of ``repeats``):

    * ``step_s``: one ``OrtDecoder.decode_one_token`` at P (cache content is stale: timing only);
    * ``bind_s``: rebinding the 4L+3 inputs/outputs for that step (Python + ORT binding overhead);
    * ``kv_copy_s``: a host memcpy of what the graph's Concat moves per step (past -> present, all layers);
      ``kv_bytes``: its size;
    * ``weights_bytes`` and ``weights_copy_s``: the graph's weight bytes and the time one memcpy of that many
      bytes takes at the measured copy bandwidth (a lower bound on the per-step weight read);
    * ``copy_GBps``: that bandwidth.

    CPU arenas only (on a GPU the copies are device-side; time ``step_s`` there instead).
    """
    if decoder.device != "cpu":
        raise ValueError("kv_update_costs measures host copies: use a CPU decoder")
    kv, out = decoder.kv, {"lengths": [], "step_s": [], "bind_s": [], "kv_copy_s": [], "kv_bytes": []}
    probe = np.zeros(decoder.hidden_size, decoder.dtype)
    for P in lengths:
        if not 0 <= P < decoder.capacity:
            raise ContextError(f"length {P} must be below the cache capacity {decoder.capacity}")

        def step():
            decoder.reset(P)
            decoder.decode_one_token(probe)

        def bind():
            decoder.reset(P)
            decoder._bind(decoder._token)

        n = kv.num_kv_heads * P * kv.head_dim
        src, dst = decoder._arena[0, :, :n], decoder._arena[1, :, :n]
        step()                                                                # warm-up
        out["lengths"].append(int(P))
        out["step_s"].append(best_of(step, repeats))
        out["bind_s"].append(best_of(bind, repeats))
        out["kv_copy_s"].append(best_of(lambda: np.copyto(dst, src), repeats))
        out["kv_bytes"].append(int(src.nbytes))
    decoder.reset()
    buf = np.ones(16 << 20, np.uint8)
    dst = np.empty_like(buf)
    bw = buf.nbytes / best_of(lambda: np.copyto(dst, buf), repeats)
    wb = int(decoder.weights_bytes or 0)
    out.update(weights_bytes=wb, weights_copy_s=wb / bw, copy_GBps=bw / 1e9)
    return out
