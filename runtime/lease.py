"""A request's use of the language model's one decoder (:class:`DecoderLease`), or of a scheduler slot
(:class:`SlotTurn`): what ``generate.TextStream`` drives for every answer that is not batched.

The decoder holds one sequence's KV cache. A lease takes ``LanguageModel.lock`` for one decoder step at a time,
never across a ``yield``, so interleaved or abandoned streams block nobody. ``LanguageModel.owner`` names (by a
token) the lease whose sequence the cache holds; a conversation's :class:`CacheRecord` remembers which positions it put
there (token ids; an image's positions by a code of its content), so its next turn keeps the longest common
prefix (``Decoder.truncate``) and prefills only what follows (``Decoder.extend``). When another request ran in
between, a step rebuilds the cache by one prefill of this turn's prompt and every token fed since (same
positions, same result up to rounding). With a ``prefix_cache.PrefixCache`` a longer snapshotted prefix is
restored instead (``Decoder.kv_write``), and :meth:`DecoderLease.snapshot` stores the finished turn there.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CacheRecord", "DecoderLease", "SlotTurn"]


class CacheRecord:
    """What one conversation last put in the decoder's cache: the lease that did it and the key of every
    position (a token id, or an image's content code)."""

    def __init__(self):
        self.lease: object | None = None             # the token of that lease (not the lease: no cycle, no leak)
        self.keys: list[int] = []


class DecoderLease:
    """One turn's use of ``lm.decoder`` (the ``Decoder`` shape ``TextStream`` drives): see the module docstring.
    ``keys`` [S] is what each prompt position holds; ``record`` is the conversation's :class:`CacheRecord`."""

    def __init__(self, lm, keys: np.ndarray, record: CacheRecord, prefix_cache=None):
        self.lm, self.dec, self.keys, self.record, self.prefix_cache = lm, lm.decoder, keys, record, prefix_cache
        self.capacity, self.hidden_size, self.dtype = self.dec.capacity, self.dec.hidden_size, self.dec.dtype
        self._prompt: np.ndarray | None = None
        self._fed: list[np.ndarray] = []
        self._fed_ids: list[int] = []
        self._next_id: int | None = None                 # set by on_token before the token is fed
        self._owner_token = object()                     # what lm.owner and the record hold (not the lease)
        self.cached = self.prefilled = 0

    @property
    def length(self) -> int:
        return 0 if self._prompt is None else len(self._prompt) + len(self._fed)

    def reset(self, length: int = 0) -> None:
        self._prompt, self._fed = None, []

    def on_token(self, token: int, _piece: str) -> None:
        self._next_id = int(token)

    def _own(self, keys: list[int]) -> None:
        self.lm.owner = self.record.lease = self._owner_token
        self.record.keys = keys

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs_embeds)
        self._prompt, self._fed, self._fed_ids = x.reshape(-1, x.shape[-1]), [], []        # [S, D]
        S = len(self._prompt)
        with self.lm.lock:
            keep = 0
            if self.lm.owner is not None and self.lm.owner is self.record.lease:
                held = np.asarray(self.record.keys[: min(self.dec.length, S - 1)], np.int64)
                diff = np.flatnonzero(held != self.keys[: held.size])
                keep = int(diff[0]) if diff.size else held.size
            pc = self.prefix_cache
            n, arrays = pc.match(self.keys, S - 1) if pc is not None and pc.enabled else (0, None)
            if n > keep:                                  # a longer prefix of this sequence was snapshotted
                self.dec.kv_write(arrays)
                keep = n
                logits = self.dec.extend(self._prompt[keep:])
            elif keep == 0:
                logits = self.dec.prefill(self._prompt)
            else:
                self.dec.truncate(keep)                   # cut back to the first differing position
                logits = self.dec.extend(self._prompt[keep:])
            self.cached, self.prefilled = keep, S - keep
            self._own([int(k) for k in self.keys])
            return np.array(logits)

    def decode_one_token(self, token_embeds: np.ndarray) -> np.ndarray:
        e = np.asarray(token_embeds, dtype=self.dtype).reshape(-1)
        self._fed.append(e)
        self._fed_ids.append(-1 if self._next_id is None else self._next_id)
        with self.lm.lock:
            if self.lm.owner is self._owner_token:
                self.record.keys.append(self._fed_ids[-1])
                return np.array(self.dec.decode_one_token(e))
            x = np.concatenate([np.asarray(self._prompt, self.dtype), np.stack(self._fed)])   # [S + n, D]
            logits = np.array(self.dec.prefill(x))       # another request ran: rebuild
            self._own([int(k) for k in self.keys] + list(self._fed_ids))
            return logits

    def snapshot(self) -> None:
        """Store what the decoder holds of this turn (prompt + answer) in the prefix cache."""
        pc = self.prefix_cache
        if pc is None or not pc.enabled:
            return
        kv = getattr(self.dec, "kv", None)            # KVSpec: the snapshot's size before reading it
        per = 0 if kv is None else kv.position_bytes
        with self.lm.lock:
            keys = list(self.record.keys)
            if self.lm.owner is not self._owner_token or len(keys) != self.dec.length or not pc.wants(keys, per):
                return
            arrays = self.dec.kv_read(len(keys))
        pc.put(keys, arrays)


class SlotTurn:
    """A turn decoded by a ``scheduler.Scheduler`` in its own KV slot: the scheduler restores the longest prefix
    the prefix cache holds and snapshots the finished turn itself, so there is nothing to snapshot here."""

    def __init__(self, stream, prompt_tokens: int):
        self.stream, self.prompt_tokens = stream, int(prompt_tokens)

    @property
    def cached(self) -> int:
        return self.stream.cached_tokens

    @property
    def prefilled(self) -> int:
        return self.prompt_tokens - self.cached

    def snapshot(self) -> None:
        pass
