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

The decoder gets three optimisation profiles (prefill, decode, extend; :data:`DECODER_PROFILE_NAMES`), and a
fourth, ``decode-batch`` (one token for each of 2..``max_batch`` sequences on a past of 0..context), when
``max_batch`` > 1: continuous batching's step (``runtime/backends/slots.py``, ``batch.py``), whose prefills
and extensions are one sequence's and take the first three. One profile for all picks poor kernels for each,
and the one-sequence step keeps its batch-1 profile. The batched step's activations are small (B tokens), so
the profile costs build time and little memory; the serving default (``safeclip-serve --max-batch``) is a
separate choice, at most what the profile covers. The runtime binds as ``past`` the KV arena's bucket, which is
at least the cached length and at most the capacity (``runtime/backends/arena.py``), so decode and extend
cover a past of up to the whole context; an extension (a chat follow-up turn) takes up to
``arena.EXTEND_MAX`` tokens per call. Every shape the runtime asks for lies inside one of them (checked by
tests).
"""
from __future__ import annotations

from dataclasses import dataclass

from safeclip.runtime.backends.arena import EXTEND_MAX
from safeclip.runtime.backends.base import DecoderNames, KVSpec, VisionNames
from safeclip.runtime.graph_spec import decoder_spec, vision_spec

GiB = 1 << 30
DECODER_PROFILE_NAMES = ("prefill", "decode", "extend", "decode-batch")   # the order decoder_profiles returns them in
MAX_BATCH_LIMIT = 256                                         # --max-batch at most this


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
    max_batch: int = 1                 # sequences one batched decode step takes (the decode-batch profile)

    def vision_profiles(self, size: int, views: int = 1, names: VisionNames = VisionNames()) -> list[dict]:
        """One profile over the views of ``vision_batch`` images; ``views`` is the most views one image
        makes (LLaVA-NeXT: base + tiles), while a single view stays the minimum."""
        b0, b1, b2 = self.vision_batch
        spec = vision_spec(size, names=names)                       # pixel_values [batch, 3, size, size]
        return [spec.profile({"batch": b0}, {"batch": b1 * views}, {"batch": b2 * views})]

    def decoder_profiles(self, hidden: int, num_layers: int, kv_heads: int, head_dim: int, context: int,
                         kv: KVSpec | None = None, names: DecoderNames = DecoderNames(),
                         max_batch: int | None = None) -> list[dict]:
        """[prefill, decode, extend, decode-batch] profiles. Prefill: past 0, seq 1..context. Decode: seq 1,
        past 0..context. Extend: seq 2..min(EXTEND_MAX, context), past 1..context (a context of 1 gets no
        extend profile). Decode-batch (``max_batch``, default the target's, > 1 only): batch 2..max_batch,
        seq 1, past 0..context, tuned (opt) for a full batch. ``kv`` (default: the standard KV names) and
        ``names`` name the tensors as the graph does."""
        mb = self.max_batch if max_batch is None else int(max_batch)
        if not 1 <= mb <= MAX_BATCH_LIMIT:
            raise ValueError(f"--max-batch must be 1..{MAX_BATCH_LIMIT}, got {mb}")
        ctx = min(self.context, context)
        b0, b1, b2 = self.decoder_batch
        opt_prefill = min(self.prefill_opt, ctx)
        spec = decoder_spec(hidden, None, kv or KVSpec(num_layers, kv_heads, head_dim, self.precision), names)

        def profile(seq, past):                                     # (min, opt, max) of seq and of past
            return spec.profile(*({"batch": b, "seq": s, "past": p} for b, s, p in zip((b0, b1, b2), seq, past)))

        out = [profile((1, opt_prefill, ctx), (0, 0, 0)),
               profile((1, 1, 1), (0, ctx // 2, ctx))]
        ext = min(EXTEND_MAX, ctx)
        if ext >= 2:
            out.append(profile((2, min(64, ext), ext), (1, ctx // 2, ctx)))
        if mb > 1:
            if len(out) < 3:
                raise ValueError("a decode-batch profile needs a context of at least 2")
            out.append(spec.profile({"batch": 2, "seq": 1, "past": 0}, {"batch": mb, "seq": 1, "past": ctx // 2},
                                    {"batch": mb, "seq": 1, "past": ctx}))
        return out


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "float32", "never", (1, 1, 16), (1, 1, 1), 640, 4096, 0,
                  "fp32 graphs for ONNX Runtime on the CPU"),
    "jetson": Target("jetson", "float16", "on-device", (1, 1, 4), (1, 1, 1), 640, 4096, 2 * GiB,
                     "Jetson Orin/Thor: fp16 graphs, batch 1 (decode steps of up to 4), engines built on the device "
                     "with safeclip-build", max_batch=4),
    "datacenter": Target("datacenter", "float16", "now-if-possible", (1, 1, 1), (1, 1, 1), 1024, 8192, 8 * GiB,
                         "datacenter GPUs: fp16 graphs, context up to 8192, decode steps of up to 16 sequences, "
                         "engines built at once with TensorRT", max_batch=16),
}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target '{name}' (supported: {', '.join(TARGETS)})") from None
