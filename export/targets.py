"""Deployment targets: presets in one table (precision, engine build, optimisation profiles, workspace).

* ``cpu``: fp32 graphs, ONNX Runtime only; nothing to build.
* ``jetson``: Orin / Thor. Half-precision graphs (norm reductions and softmax kept fp32), batch-1 profiles,
  a workspace sized for memory shared between CPU and GPU. Engines are built *on the device* by
  ``safeclip-build`` (TensorRT plans are not portable across GPUs or TensorRT versions); the exporter
  writes the ONNX graphs and the build plan into the manifest.
* ``datacenter``: half precision, a longer context and a larger workspace, engines built at once when
  TensorRT and a GPU are present on the exporting machine, else (like jetson) by ``safeclip-build`` on the
  serving machine.

Batch profiles are what the runtime runs, on every target: the vision graph gets the views of one image
(1, or base + tiles for LLaVA-NeXT) and the decoder one sequence. A larger profile would only cost memory:
the TensorRT vision session sizes its buffers for the largest shape a profile allows (a 32-image profile
was about 1 GB of buffers for LLaVA-NeXT).

The decoder gets two optimisation profiles (prefill and decode): one profile for both picks poor kernels
for both. Every shape the runtime asks for lies inside one of them (checked by tests).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    precision: str                     # graph precision: float32 | float16
    build_engines: str                 # never | on-device | now-if-possible
    vision_batch: tuple[int, int, int]  # min, opt, max views per vision call
    decoder_batch: tuple[int, int, int]
    prefill_opt: int                   # typical prompt length (image positions + text)
    context: int                       # KV capacity the profiles allow (clamped to the model's)
    workspace_bytes: int
    description: str

    def vision_profiles(self, size: int, views: int = 1) -> list[dict]:
        """One profile over the views of ``vision_batch`` images; ``views`` is the most views one image
        makes (LLaVA-NeXT: base + tiles), while a single view stays the minimum."""
        b0, b1, b2 = self.vision_batch
        shape = lambda n: [n, 3, size, size]
        return [{"pixel_values": {"min": shape(b0), "opt": shape(b1 * views), "max": shape(b2 * views)}}]

    def decoder_profiles(self, hidden: int, num_layers: int, kv_heads: int, head_dim: int,
                         context: int) -> list[dict]:
        """[prefill, decode] profiles. Prefill: past 0, seq 1..context. Decode: seq 1, past 0..context-1."""
        ctx = min(self.context, context)
        b0, b1, b2 = self.decoder_batch
        opt_prefill = min(self.prefill_opt, ctx)

        def profile(seq, past):
            (s0, s1, s2), (p0, p1, p2) = seq, past
            prof = {"inputs_embeds": {"min": [b0, s0, hidden], "opt": [b1, s1, hidden], "max": [b2, s2, hidden]},
                    "attention_mask": {"min": [b0, p0 + s0], "opt": [b1, p1 + s1], "max": [b2, p2 + s2]},
                    "position_ids": {"min": [b0, s0], "opt": [b1, s1], "max": [b2, s2]}}
            for i in range(num_layers):
                for kind in ("key", "value"):
                    prof[f"past_key_values.{i}.{kind}"] = {"min": [b0, kv_heads, p0, head_dim],
                                                            "opt": [b1, kv_heads, p1, head_dim],
                                                            "max": [b2, kv_heads, p2, head_dim]}
            return prof

        return [profile((1, opt_prefill, ctx), (0, 0, 0)),
                profile((1, 1, 1), (0, ctx // 2, ctx - 1))]


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "float32", "never", (1, 1, 16), (1, 1, 1), 640, 4096, 0,
                  "fp32 graphs for ONNX Runtime on the CPU"),
    "jetson": Target("jetson", "float16", "on-device", (1, 1, 4), (1, 1, 1), 640, 4096, 2 * GiB,
                     "Jetson Orin/Thor: fp16 graphs, batch 1, engines built on the device with safeclip-build"),
    "datacenter": Target("datacenter", "float16", "now-if-possible", (1, 1, 1), (1, 1, 1), 1024, 8192, 8 * GiB,
                         "datacenter GPUs: fp16 graphs, context up to 8192, engines built at once with TensorRT"),
}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target '{name}' (supported: {', '.join(TARGETS)})") from None
