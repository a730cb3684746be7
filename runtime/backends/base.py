"""What the generation loop and every backend share: the errors, :func:`truncation` and the decoder interface.

Both sides import this module and nothing of each other: ``generate.py`` (the loop) talks to any object
with the :class:`Decoder` shape, and the backends (``ort.py``, ``trt.py``) build such objects without
reaching back into the loop. Standard library only. Tensor names and the KV layout are the graph spec's
(``runtime/graph_spec.py``).
"""
from __future__ import annotations

from typing import Any, Protocol

__all__ = ["BackendError", "ContextError", "Decoder", "truncation"]


class BackendError(RuntimeError):
    """A backend is unavailable or cannot load a graph."""


class ContextError(ValueError):
    """The prompt does not fit the decoder's context capacity."""


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
    def kv_read(self, length: int) -> list: ...            # host copies [1, KVH, length, Hd], graph_spec.KVSpec order
    def kv_write(self, arrays: list) -> None: ...           # replace the cache by such arrays
