"""``Pipeline``: a verified bundle, its vision+gate graph and (when present) its language model.

    pipe = Pipeline.load("engines/demo")
    verdict = pipe.gate("photo.jpg")                 # Verdict(flagged, category, score, probs, ...)

Loading verifies the manifest and every file (see ``manifest.py``) and then checks that the vision graph
really emits the gate output with one probability per manifest class; anything else refuses to serve.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .backends import make_session
from .gate import Verdict, verdict_from_probs
from .image import MAX_PIXELS, load_image, preprocess
from .manifest import FEATURES_OUTPUT, GATE_OUTPUT, BundleError, Manifest, load_manifest


class Pipeline:
    def __init__(self, manifest: Manifest, vision, backend: str):
        self.manifest = manifest
        self.vision = vision
        self.backend = backend
        g = manifest.gate
        self.classes: list[str] = list(g["classes"])
        self.safe_classes: list[str] = list(g["safe_classes"])
        self.threshold = float(g["threshold"])

    @classmethod
    def load(cls, bundle_dir: str | Path, backend: str = "auto", full_verify: bool = False,
             threads: int | None = None) -> "Pipeline":
        m = load_manifest(bundle_dir, full_verify=full_verify)
        device = "cpu" if backend in ("auto", "onnxruntime", "cpu") else backend
        vg = m.graphs["vision_gate"]
        vision = make_session(m.path(vg["file"]), device=device, threads=threads)
        shape = vision.output_shapes.get(GATE_OUTPUT)
        if FEATURES_OUTPUT not in vision.output_names or shape is None:
            raise BundleError(f"{m.root}: vision graph does not emit '{GATE_OUTPUT}': refusing to serve ungated")
        if shape[-1] != len(m.gate["classes"]):
            raise BundleError(f"{m.root}: vision graph's gate width {shape[-1]} differs from the manifest's "
                              f"{len(m.gate['classes'])} classes")
        return cls(m, vision, f"onnxruntime-{vision.provider.replace('ExecutionProvider', '').lower()}")

    # -- vision + gate ----------------------------------------------------------------------------------
    def pixel_values(self, image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        return preprocess(load_image(image, max_pixels=max_pixels), self.manifest.preprocess)

    def encode(self, image, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, Verdict]:
        """(image_features [1, N, D_lm], verdict) for one image (path, bytes or PIL image)."""
        pv = self.pixel_values(image, max_pixels)                  # [1, 3, H, W]
        t0 = time.perf_counter()
        out = self.vision.run({"pixel_values": pv})
        ms = (time.perf_counter() - t0) * 1e3
        probs = out.get(GATE_OUTPUT)
        v = verdict_from_probs(None if probs is None else probs[0], self.classes, self.safe_classes,
                               self.threshold, latency_ms=ms)
        return out[FEATURES_OUTPUT], v

    def gate(self, image, max_pixels: int = MAX_PIXELS) -> Verdict:
        return self.encode(image, max_pixels)[1]
