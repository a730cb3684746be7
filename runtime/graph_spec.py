"""One spec per graph: tensor names, dtypes and dimensions, from which everything shape-related is derived.

Supported graphs: ``vision_gate`` (:func:`vision_spec`) and ``decoder`` (:func:`decoder_spec`). A dimension
is an int or a symbol: ``batch``, ``seq``, ``past`` or the sum ``past+seq`` (attention_mask). From
a :class:`GraphSpec` come

* the manifest's I/O section (:attr:`GraphSpec.inputs_by_name` / ``outputs_by_name``: the ``inputs`` /
  ``outputs`` of a ``contract.VisionGraph`` or ``DecoderGraph``, which writes and reads them);
* the exporter's ``torch.export`` dynamic axes (:meth:`GraphSpec.dynamic_axes`; a sum gets its own
  free dimension, since ``dynamic_shapes`` cannot express ``Dim + Dim``);
* concrete input shapes for given symbol sizes (:meth:`GraphSpec.shapes`): the shapes of one decoder call
  (``backends/trt.py``) and, at min/opt/max sizes, TensorRT optimisation profiles (:meth:`GraphSpec.profile`,
  used by ``export/targets.py``).

Tensor names live here and nowhere else: a bundle's manifest names every tensor the runtime binds
(``graphs.<graph>.names`` and ``graphs.decoder.kv``); :class:`VisionNames`, :class:`DecoderNames` and
:class:`KVSpec` carry them from the manifest to the backends. Their defaults are the names this project's
exporter writes (and the names bundles written before ``names`` existed use). :class:`KVSpec` also states
the one KV order (layer by layer: layer i's key, then layer i's value, as the graph takes and returns
them).

Standard library + numpy only, and no backend: the exporter, the builder, the manifest and the backends all
import it.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["KV_FORM", "VisionNames", "DecoderNames", "KVSpec", "TensorDecl", "GraphSpec", "vision_spec",
           "decoder_spec", "shared_decoder_spec", "SharedDecoderNames", "KV_FORMS", "KV_SHARED"]

Dim = int | str

# The manifest's ``graphs.decoder.kv.form`` for a graph whose KV outputs are the call's new rows only,
# [B, KVH, S, Hd] (decoder contract 2, ``contract.py``); bundles without it return past + new and are refused.
KV_FORM = "new"


@dataclass(frozen=True)
class VisionNames:
    """Tensor names of the vision+gate graph."""
    pixel_values: str = "pixel_values"          # input  [B, 3, H, W] float32
    image_features: str = "image_features"      # output [B, N, D_lm]
    class_probs: str = "class_probs"            # output [B, C] float32, the gate

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.pixel_values,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.image_features, self.class_probs)


@dataclass(frozen=True)
class DecoderNames:
    """Tensor names of the decoder graph besides the KV cache (those are :class:`KVSpec`'s)."""
    inputs_embeds: str = "inputs_embeds"        # input  [B, S, D]
    attention_mask: str = "attention_mask"      # input  [B, P+S] int64
    position_ids: str = "position_ids"          # input  [B, S] int64
    logits: str = "logits"                      # output [B, 1, V]

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.inputs_embeds, self.attention_mask, self.position_ids)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.logits,)


@dataclass(frozen=True)
class KVSpec:
    """KV-cache layout of a decoder graph, as the manifest's ``graphs.decoder.kv`` states it.

    The one KV order, everywhere (graph inputs and outputs, :meth:`names`, the backends' arena tensors,
    ``Decoder.kv_read`` / ``kv_write`` arrays, prefix-cache snapshots): interleaved per layer, layer 0 key,
    layer 0 value, layer 1 key, ... -- KV tensor ``j`` is layer ``j // 2``'s key (``j`` even) or value (odd).
    """
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"        # outputs: the call's new rows [B, KVH, S, Hd] (KV_FORM)
    present_value: str = "present.{i}.value"

    @classmethod
    def from_manifest(cls, kv: dict) -> "KVSpec":
        return cls(**{k: kv[k] for k in cls.__dataclass_fields__ if k in kv})

    @property
    def position_bytes(self) -> int:
        """Bytes one cached position takes: every layer's key and value row."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    def names(self) -> list[tuple[str, str]]:
        """(past, present) tensor names in the KV order: layer i's key, then layer i's value, for each i."""
        return [pair for i in range(self.num_layers)
                for pair in ((self.past_key.format(i=i), self.present_key.format(i=i)),
                             (self.past_value.format(i=i), self.present_value.format(i=i)))]

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``graphs.decoder.kv``: every field, and ``form`` (:data:`KV_FORM`) after ``dtype``."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            out[k] = v
            if k == "dtype":
                out["form"] = KV_FORM
        return out

    @staticmethod
    def layer_tensors(layer: int) -> tuple[int, int]:
        """Indices of ``layer``'s key and value among the KV tensors (:meth:`names` order)."""
        return 2 * layer, 2 * layer + 1


@dataclass(frozen=True)
class TensorDecl:
    """One tensor of a graph, the one declaration class: the graph spec declares them, and the manifest's
    ``graphs.<graph>.inputs`` / ``outputs`` are read into them (``contract.py``) and written from them."""
    name: str
    shape: tuple[Dim, ...]      # ints, or names of dynamic dimensions ("batch", "seq", "past+seq")
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        """This tensor's entry under the manifest's ``inputs`` / ``outputs`` (keyed by its name there)."""
        return {"shape": list(self.shape), "dtype": self.dtype}


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

    @property
    def inputs_by_name(self) -> dict[str, TensorDecl]:
        """The inputs as the manifest section holds them (``{name: TensorDecl}``, positional order)."""
        return {t.name: t for t in self.inputs}

    @property
    def outputs_by_name(self) -> dict[str, TensorDecl]:
        return {t.name: t for t in self.outputs}

    def shapes(self, dynamic_only: bool = False, **sizes: int) -> dict[str, tuple[int, ...]]:
        """Input shapes for the given symbol sizes (``batch=1, seq=7, past=0``)."""
        return {t.name: tuple(_size(d, sizes) for d in t.shape) for t in self.inputs
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
            for i, d in enumerate(t.shape):
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
    past = [TensorDecl(p, ("batch", h, "past", d), dt) for p, _ in kv.names()]        # the KV order (KVSpec)
    present = [TensorDecl(n, ("batch", h, "seq", d), dt) for _, n in kv.names()]
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
