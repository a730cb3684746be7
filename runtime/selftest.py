"""The gate's known-answer self-test, like a crypto module's power-on self-test.

The exporter runs the exported vision+gate graph on a few fixed synthetic probe images and records its outputs in
``gate.self_test``; every ``Pipeline.load`` runs the same probes through the vision session it will serve with
(ONNX Runtime CPU/CUDA or the TensorRT engine) and refuses the bundle when an output differs. This catches a gate
graph that was swapped, corrupted or re-weighted (e.g. replaced by one that always answers the safe class) even in
an unsigned bundle whose file hashes and integrity digest were recomputed -- unless whoever swapped it also
rewrote the recorded answers, which only a signature (``signing.py``) rules out.

Supported: probe set ``v1``, two images of the graph's input size computed in closed form (no random generator, so
every numpy gives the same pixels): all zeros (the normalised mean image) and a smooth three-channel sinusoid
spanning the normalised range [-1.8, 2.1]. Recorded per probe: all class probabilities, and 16 image-feature values
at fixed flat positions. Each probe runs alone (batch 1, inside every TensorRT profile).

Tolerance: the build gate's engine tolerance of the graph's precision (``tolerances.ENGINE``; fp32 1e-2, fp16
5e-2, times max(1, max|recorded|)), because a TensorRT engine is held to exactly that against ONNX Runtime when
``safeclip-build`` makes it, and the recorded answers are ONNX Runtime's. A replaced gate head is far outside it
on probabilities in [0, 1] unless its answers coincide with the real ones on these probes. Cost at load: two
vision passes (``BENCHMARKS.md``, "gate self-test").
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .tolerances import engine_tolerance

PROBE_SET = "v1"
N_FEATURE_SAMPLES = 16

__all__ = ["PROBE_SET", "SelfTestError", "probe_images", "record", "check", "check_session"]


class SelfTestError(ValueError):
    """The gate's answers on the probes differ from the recorded ones (or none were recorded)."""


def probe_images(size: int) -> np.ndarray:
    """[2, 3, size, size] float32: the v1 probes (module docstring)."""
    y, x = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    waves = [np.sin(2 * np.pi * (x * (c + 1) / size + y * (3 - c) / size) + c) for c in range(3)]   # [3][H, W]
    pattern = 0.15 + 1.95 * np.stack(waves)                                  # in [-1.8, 2.1]
    return np.stack([np.zeros((3, size, size)), pattern]).astype(np.float32)


def _sample_positions(n: int) -> np.ndarray:
    return np.linspace(0, n - 1, N_FEATURE_SAMPLES).round().astype(np.int64)


def _outputs(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], size: int) -> tuple[list, list]:
    """(class_probs per probe, sampled features per probe); ``run(pixel_values [1,3,S,S]) -> (features, probs)``."""
    probs, feats = [], []
    for pv in probe_images(size):
        f, p = run(pv[None])
        f, p = np.asarray(f, np.float32).reshape(-1), np.asarray(p, np.float64).reshape(-1)
        probs.append(p.tolist())
        feats.append(f[_sample_positions(f.size)].astype(np.float64).tolist())
    return probs, feats


def record(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], size: int, precision: str) -> dict:
    """The manifest's ``gate.self_test`` for the graph behind ``run`` (called by the exporter)."""
    probs, feats = _outputs(run, size)
    return {"probes": PROBE_SET, "size": int(size), "precision": precision, "class_probs": probs,
            "feature_samples": feats}


def check(recorded, run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], size: int) -> float:
    """Run the probes and compare with ``recorded``; returns the worst error relative to its bound (<= 1).
    Raises :class:`SelfTestError` with one line naming the output, the error and the tolerance."""
    if not isinstance(recorded, dict) or recorded.get("probes") != PROBE_SET:
        raise SelfTestError(f"the bundle records no gate self-test (probe set {PROBE_SET}); re-export it with "
                            "this safeclip-export")
    if recorded.get("size") != size:
        raise SelfTestError(f"gate self-test was recorded at {recorded.get('size')} pixels, the graph takes {size}")
    tol = engine_tolerance(str(recorded.get("precision")))
    probs, feats = _outputs(run, size)
    worst = 0.0
    for name, want_all, got_all in (("class_probs", recorded.get("class_probs"), probs),
                                    ("image_features", recorded.get("feature_samples"), feats)):
        try:
            want = np.asarray(want_all, np.float64)
        except (TypeError, ValueError):
            raise SelfTestError(f"gate self-test record of {name} is malformed") from None
        got = np.asarray(got_all, np.float64)
        if want.shape != got.shape:
            raise SelfTestError(f"gate self-test failed: {name} has shape {list(got.shape)} on the probes, "
                                f"recorded {list(want.shape)}: the gate graph is not the one exported")
        bound = tol.of(want)
        err = float(np.abs(want - got).max()) if np.isfinite(got).all() else float("inf")
        if not err <= bound:
            raise SelfTestError(f"gate self-test failed: {name} differs from the recorded answer by {err:.3g} "
                                f"(tolerance {bound:.3g}): the gate graph was swapped or corrupted")
        worst = max(worst, err / bound if bound else 0.0)
    return worst


def check_session(m, session) -> None:
    """Run bundle ``m``'s recorded probes (``gate.self_test``) through ``session``, the vision session that will
    serve (ONNX Runtime or TensorRT); ``manifest.BundleError`` naming the bundle on any mismatch."""
    from .manifest import BundleError

    names = m.vision.names
    size = m.vision.inputs[names.pixel_values].shape[-1]

    def run(pv: np.ndarray):                                      # pixel_values [1, 3, S, S]
        out = session.run({names.pixel_values: pv})
        return out[names.image_features], out[names.class_probs]

    try:
        if not isinstance(size, int):
            raise SelfTestError(f"the vision graph's input size {size!r} is not fixed")
        check(m.gate.get("self_test"), run, size)
    except SelfTestError as e:
        raise BundleError(f"{m.root}: {e}") from None
