"""One spec per graph: tensor names, dtypes and dimensions, from which everything shape-related is derived.

Supported graphs: ``vision_gate`` (:func:`vision_spec`) and ``decoder`` (:func:`decoder_spec`). A dimension
is an int or a symbol: ``batch``, ``seq``, ``past`` or the sum ``past+seq`` (attention_mask). From
a :class:`GraphSpec` come

* the manifest's I/O section (:meth:`GraphSpec.io_json`), which the runtime reads back;
* the exporter's ``torch.export`` dynamic axes (:meth:`GraphSpec.dynamic_axes`; a sum gets its own
  free dimension, since ``dynamic_shapes`` cannot express ``Dim + Dim``);
* concrete input shapes for given symbol sizes (:meth:`GraphSpec.shapes`): the shapes of one decoder call
  (``backends/trt.py``) and, at min/opt/max sizes, TensorRT optimisation profiles (:meth:`GraphSpec.profile`,
  used by ``export/targets.py``).

Names come from :mod:`~safeclip.runtime.backends.base` (``VisionNames``, ``DecoderNames``, ``KVSpec``).
Standard library only: the exporter, the builder and the runtime all import it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .backends.base import DecoderNames, KVSpec, VisionNames

__all__ = ["TensorDecl", "GraphSpec", "vision_spec", "decoder_spec", "shared_decoder_spec", "SharedDecoderNames",
           "KV_FORMS", "KV_SHARED"]

Dim = int | str


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dims: tuple[Dim, ...]
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.dims)


def _size(d: Dim, sizes: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    try:
        return sum(int(sizes[s]) for s in d.split("+"))
    except KeyError as e:
        raise ValueError(f"no size given for dimension '{e.args[0]}' (given: {', '.join(sizes)})") from None


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def io_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The manifest's ``inputs`` / ``outputs`` of this graph: ``{name: {"shape": dims, "dtype": dtype}}``."""
        return {key: {t.name: {"shape": list(t.dims), "dtype": t.dtype} for t in ts}
                for key, ts in (("inputs", self.inputs), ("outputs", self.outputs))}

    def shapes(self, dynamic_only: bool = False, **sizes: int) -> dict[str, tuple[int, ...]]:
        """Input shapes for the given symbol sizes (``batch=1, seq=7, past=0``)."""
        return {t.name: tuple(_size(d, sizes) for d in t.dims) for t in self.inputs
                if t.dynamic or not dynamic_only}

    def profile(self, lo: Mapping[str, int], opt: Mapping[str, int], hi: Mapping[str, int]) -> dict:
        """A TensorRT optimisation profile over the dynamic inputs: ``{name: {"min", "opt", "max"}}``."""
        at = {k: self.shapes(True, **v) for k, v in (("min", lo), ("opt", opt), ("max", hi))}
        return {n: {k: list(at[k][n]) for k in ("min", "opt", "max")} for n in at["min"]}

    def dynamic_axes(self, dim: Callable[[str], Any], free: Any) -> dict[str, dict[int, Any]]:
        """Per input, ``{axis: dim(symbol)}`` for torch.export; a sum of symbols gets ``free``."""
        made: dict[str, Any] = {}
        out = {}
        for t in self.inputs:
            axes = {}
            for i, d in enumerate(t.dims):
                if isinstance(d, str):
                    axes[i] = free if "+" in d else made.setdefault(d, dim(d))
            if axes:
                out[t.name] = axes
        return out


def vision_spec(size: int, n_tokens: int | None = None, d_lm: int | None = None, n_classes: int | None = None,
                precision: str = "float32", names: VisionNames = VisionNames()) -> GraphSpec:
    """pixel_values [batch, 3, size, size] -> image_features [batch, N, D_lm] (``precision``),
    class_probs [batch, C] (float32: the gate head stays fp32). ``n_tokens=None``: inputs only."""
    outputs = () if n_tokens is None else (TensorDecl(names.image_features, ("batch", n_tokens, d_lm), precision),
                                           TensorDecl(names.class_probs, ("batch", n_classes), "float32"))
    return GraphSpec((TensorDecl(names.pixel_values, ("batch", 3, size, size), "float32"),), outputs)


@functools.lru_cache(maxsize=64)                   # the TensorRT decoder asks for its spec every step
def decoder_spec(hidden: int, vocab: int | None, kv: KVSpec, names: DecoderNames = DecoderNames()) -> GraphSpec:
    """The decoder graph in positional order: embeddings, mask, positions, then each layer's past key and
    value; logits (one position) then each layer's *new* key and value (the call's S rows only: the runtime
    writes them into its one KV arena, ``backends/arena.py``). ``vocab=None``: inputs only."""
    dt, h, d = kv.dtype, kv.num_kv_heads, kv.head_dim
    past = [TensorDecl(n, ("batch", h, "past", d), dt)
            for i in range(kv.num_layers) for n in (kv.past_key.format(i=i), kv.past_value.format(i=i))]
    present = [TensorDecl(n, ("batch", h, "seq", d), dt)
               for i in range(kv.num_layers) for n in (kv.present_key.format(i=i), kv.present_value.format(i=i))]
    inputs = (TensorDecl(names.inputs_embeds, ("batch", "seq", hidden), dt),
              TensorDecl(names.attention_mask, ("batch", "past+seq"), "int64"),
              TensorDecl(names.position_ids, ("batch", "seq"), "int64"), *past)
    outputs = () if vocab is None else (TensorDecl(names.logits, ("batch", 1, vocab), dt), *present)
    return GraphSpec(inputs, outputs)


# -- the decoder KV form "shared" (``export/fused_decoder.py``: ONNX Runtime's GroupQueryAttention) --------------
KV_SHARED = "shared"


@dataclass(frozen=True)
class SharedDecoderNames:
    """Tensor names of a decoder of KV form ``"shared"`` besides the KV cache: GroupQueryAttention takes each
    sequence's length instead of a mask and positions (rotary positions are the lengths), and its past and
    present KV are one buffer [B, KVH, C, Hd] written in place."""
    inputs_embeds: str = "inputs_embeds"                    # input  [B, S, D]
    seqlens_k: str = "seqlens_k"                            # input  [B] int32: total length - 1 per sequence
    total_sequence_length: str = "total_sequence_length"    # input  [] int32: the longest total length
    logits: str = "logits"                                  # output [B, 1, V]

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.inputs_embeds, self.seqlens_k, self.total_sequence_length)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.logits,)


# graphs.decoder.kv.form -> the names of its non-KV tensors. "new": the graph returns the call's new rows, the
# runtime copies them into its arena (``backends/arena.py``); "shared": past and present are one buffer.
KV_FORMS: dict[str, type] = {"new": DecoderNames, KV_SHARED: SharedDecoderNames}


@functools.lru_cache(maxsize=16)
def shared_decoder_spec(hidden: int, vocab: int | None, kv: KVSpec,
                        names: SharedDecoderNames = SharedDecoderNames()) -> GraphSpec:
    """The ``"shared"`` decoder graph in positional order: embeddings, lengths, total length, each layer's KV
    buffer (key, value) [batch, KVH, past, Hd] where ``past`` is the buffer's capacity; logits, then the same
    buffers as outputs (bound to the same memory: the call's rows are written in place)."""
    dt, h, d = kv.dtype, kv.num_kv_heads, kv.head_dim
    past = [TensorDecl(n, ("batch", h, "past", d), dt)
            for i in range(kv.num_layers) for n in (kv.past_key.format(i=i), kv.past_value.format(i=i))]
    present = [TensorDecl(n, ("batch", h, "past", d), dt)
               for i in range(kv.num_layers) for n in (kv.present_key.format(i=i), kv.present_value.format(i=i))]
    inputs = (TensorDecl(names.inputs_embeds, ("batch", "seq", hidden), dt),
              TensorDecl(names.seqlens_k, ("batch",), "int32"),
              TensorDecl(names.total_sequence_length, (), "int32"), *past)
    outputs = () if vocab is None else (TensorDecl(names.logits, ("batch", 1, vocab), dt), *present)
    return GraphSpec(inputs, outputs)
