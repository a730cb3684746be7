"""What the generation loop and every backend share: the errors, the graphs' tensor names, the KV-cache layout,
the decoder interface.

Both sides import this module and nothing of each other: ``generate.py`` (the loop) talks to any object
with the :class:`Decoder` shape, and the backends (``ort.py``, ``trt.py``) build such objects without
reaching back into the loop. Standard library only.

Tensor names: a bundle's manifest names every tensor the runtime binds (``graphs.<graph>.names`` and
``graphs.decoder.kv``); :class:`VisionNames`, :class:`DecoderNames` and :class:`KVSpec` carry them from the
manifest to the backends. Their defaults are the names this project's exporter writes (and the names
bundles written before ``names`` existed use); they are spelled here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["BackendError", "ContextError", "KVSpec", "VisionNames", "DecoderNames", "Decoder", "KV_FORM"]

# The manifest's ``graphs.decoder.kv.form`` for a graph whose KV outputs are the call's new rows only,
# [B, KVH, S, Hd] (decoder contract 2, ``contract.py``); bundles without it return past + new and are refused.
KV_FORM = "new"


class BackendError(RuntimeError):
    """A backend is unavailable or cannot load a graph."""


class ContextError(ValueError):
    """The prompt does not fit the decoder's context capacity."""


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
    """KV-cache layout of a decoder graph, as the manifest's ``graphs.decoder.kv`` states it."""
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
        """(past, present) tensor names: every layer's key, then every layer's value."""
        L = range(self.num_layers)
        return [(self.past_key.format(i=i), self.present_key.format(i=i)) for i in L] + \
               [(self.past_value.format(i=i), self.present_value.format(i=i)) for i in L]


def truncation(cached: int, length: int) -> int | None:
    """What ``truncate(length)`` of ``cached`` positions has to do: ``None`` when nothing moves, else the new
    length (0: a reset). Raises :class:`ContextError` outside ``0..cached``."""
    n = int(length)
    if not 0 <= n <= cached:
        raise ContextError(f"cannot truncate {cached} cached positions to {n}")
    return None if n == cached else n


class Decoder(Protocol):
    """A decoder session with its KV cache: what :mod:`safeclip.runtime.generate` drives."""
    capacity: int             # most tokens the cache holds (prompt + generated)
    length: int               # tokens cached now
    hidden_size: int
    dtype: Any                # numpy dtype of the embeddings it takes

    def prefill(self, inputs_embeds) -> Any: ...            # [S, D] -> logits [V]
    def decode_one_token(self, token_embeds) -> Any: ...    # [D] -> logits [V]
    def reset(self, length: int = 0) -> None: ...
    def extend(self, inputs_embeds) -> Any: ...             # [S, D] after the cached ones -> logits [V]
    def truncate(self, length: int) -> None: ...            # keep the first ``length`` cached positions
    def kv_read(self, length: int) -> list: ...            # host copies [1, KVH, length, Hd], KVSpec.names() order
    def kv_write(self, arrays: list) -> None: ...           # replace the cache by such arrays
