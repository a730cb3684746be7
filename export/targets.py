"""Deployment targets: presets in one table (precision, engine build, optimisation profiles, workspace).

* ``cpu``: fp32 graphs, ONNX Runtime only; nothing to build. The decoder is written with ONNX Runtime's fused
  contrib operators (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits:
  ``fused_decoder.py``); the TensorRT targets keep the standard operators TensorRT's parser takes.
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

The decoder gets three optimisation profiles (:data:`DECODER_PROFILE_NAMES`):

* ``prefill``: one sequence, past 0, 1..``chunk`` tokens. A longer prompt is prefilled in chunks: its first
  ``chunk`` tokens here, the rest through ``extend`` (as TensorRT-LLM's and Edge-LLM's chunked context do), so
  no profile's attention scores [1, H, S, P+S] grow with the context squared.
* ``decode``: one token for each of 1..``max_batch`` sequences on a past of 0..context. The one-sequence step
  and continuous batching's step (``runtime/backends/slots.py``) share it, so a batch that grows from one
  sequence to several never switches profiles (a switch makes TensorRT update layer resources on the next call;
  the profile's ``opt`` is the target's ``decode_opt_batch``).
* ``extend``: one sequence, 2..min(``EXTEND_MAX``, ``chunk``) tokens on a past of 1..context: a chat follow-up
  turn and the later chunks of a long prompt.

Bounds, checked by :meth:`Target.decoder_profiles` for the model's head count: no tensor of any profile may
reach 2^31 elements (TensorRT 10.3 ``NvInfer.h``: "the volume of a tensor must be less than 2^31"; the largest
is the attention scores [B, H, S, P+S]), so the chunk is lowered, a power of two at a time, until it fits; and
the runtime creates its execution context with ``ON_PROFILE_CHANGE`` memory (``runtime/backends/trt.py``), so the
activation memory held is the active profile's, not the maximum over all three for the process's life. The
runtime binds as ``past`` the KV arena's bucket, which is at least the cached length and at most the capacity
(``runtime/backends/arena.py``), so decode and extend cover a past of up to the whole context. Every shape the
runtime asks for lies inside one of them (checked by tests).
"""
from __future__ import annotations

from dataclasses import dataclass

from safeclip.runtime.backends.arena import EXTEND_MAX
from safeclip.runtime.graph_spec import DecoderNames, KVSpec, VisionNames
from safeclip.runtime.graph_spec import decoder_spec, vision_spec

GiB = 1 << 30
DECODER_PROFILE_NAMES = ("prefill", "decode", "extend")     # the order decoder_profiles returns them in
MAX_BATCH_LIMIT = 256                                         # --max-batch at most this
VOLUME_LIMIT = 1 << 31                                        # TensorRT: every tensor's volume below 2^31 elements


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
    max_batch: int = 1                 # sequences one decode step takes (the decode profile's batch range)
    prefill_chunk: int = 512           # most tokens one prefill call takes (longer prompts go on in extend calls)
    decode_opt_batch: int = 1          # the decode profile's opt batch (kernels are tuned for it)
    fused_ops: bool = False            # decoder of ONNX Runtime's contrib operators (export/fused_decoder.py)

    def vision_profiles(self, size: int, views: int = 1, names: VisionNames = VisionNames()) -> list[dict]:
        """One profile over the views of ``vision_batch`` images; ``views`` is the most views one image
        makes (LLaVA-NeXT: base + tiles), while a single view stays the minimum."""
        b0, b1, b2 = self.vision_batch
        spec = vision_spec(size, names=names)                       # pixel_values [batch, 3, size, size]
        return [spec.profile({"batch": b0}, {"batch": b1 * views}, {"batch": b2 * views})]

    def decoder_profiles(self, hidden: int, num_layers: int, kv_heads: int, head_dim: int, context: int,
                         kv: KVSpec | None = None, names: DecoderNames = DecoderNames(),
                         max_batch: int | None = None, num_heads: int | None = None) -> list[dict]:
        """[prefill, decode, extend] profiles (module docstring). ``max_batch`` (default the target's) sizes the
        decode profile's batch; ``num_heads`` (default ``hidden // head_dim``) bounds the attention scores;
        ``kv`` (default: the standard KV names) and ``names`` name the tensors as the graph does."""
        mb = self.max_batch if max_batch is None else int(max_batch)
        if not 1 <= mb <= MAX_BATCH_LIMIT:
            raise ValueError(f"--max-batch must be 1..{MAX_BATCH_LIMIT}, got {mb}")
        ctx = min(self.context, context)
        heads = int(num_heads or hidden // head_dim)
        chunk, ext = self.chunks(heads, ctx)
        if mb * heads * (ctx + 1) >= VOLUME_LIMIT:
            raise ValueError(f"a decode step of {mb} sequences on a context of {ctx} makes attention scores of "
                             f"{mb * heads * (ctx + 1)} elements, past TensorRT's 2^31: lower --max-batch")
        b0, b1, b2 = self.decoder_batch
        spec = decoder_spec(hidden, None, kv or KVSpec(num_layers, kv_heads, head_dim, self.precision), names)

        def profile(batch, seq, past):                              # (min, opt, max) of each
            return spec.profile(*({"batch": b, "seq": s, "past": p} for b, s, p in zip(batch, seq, past)))

        out = [profile((b0, b1, b2), (1, min(self.prefill_opt, chunk), chunk), (0, 0, 0)),
               profile((1, min(self.decode_opt_batch, mb), mb), (1, 1, 1), (0, ctx // 2, ctx))]
        if ext >= 2:
            out.append(profile((b0, b1, b2), (2, min(64, ext), ext), (1, ctx // 2, ctx)))
        return out

    def chunks(self, heads: int, context: int) -> tuple[int, int]:
        """(prefill chunk, extend chunk) for a model of ``heads`` attention heads at ``context`` tokens: the
        target's, lowered by halves until the attention scores of a prefill [1, H, c, c] and of an extension
        [1, H, e, context + e] stay below TensorRT's 2^31 elements."""
        ctx = int(context)
        chunk = min(self.prefill_chunk, ctx)
        while chunk > 1 and heads * chunk * chunk >= VOLUME_LIMIT:
            chunk //= 2
        ext = min(EXTEND_MAX, chunk, ctx)
        while ext > 1 and heads * ext * (ctx + ext) >= VOLUME_LIMIT:
            ext //= 2
        return chunk, ext


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "float32", "never", (1, 1, 16), (1, 1, 1), 640, 4096, 0,
                  "fp32 graphs for ONNX Runtime on the CPU; the decoder uses ONNX Runtime's fused operators",
                  fused_ops=True),
    "jetson": Target("jetson", "float16", "on-device", (1, 1, 4), (1, 1, 1), 512, 4096, 2 * GiB,
                     "Jetson Orin/Thor: fp16 graphs, batch 1 (decode steps of up to 4), prompts prefilled in chunks "
                     "of 512, engines built on the device with safeclip-build", max_batch=4, prefill_chunk=512),
    "datacenter": Target("datacenter", "float16", "now-if-possible", (1, 1, 1), (1, 1, 1), 1024, 8192, 8 * GiB,
                         "datacenter GPUs: fp16 graphs, context up to 8192, decode steps of up to 16 sequences, "
                         "prompts prefilled in chunks of 2048, engines built at once with TensorRT", max_batch=16,
                         prefill_chunk=2048, decode_opt_batch=8),
}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target '{name}' (supported: {', '.join(TARGETS)})") from None
