"""A bounded cache of conversation prefixes' KV, keyed by token ids (the server's ``--prefix-cache-mb``).

A stateless client (any OpenAI chat client, the kiosk page) re-sends the whole history with every request. After
a turn, :class:`~safeclip.runtime.chat.Chat` snapshots the decoder's cache (``Decoder.kv_read``: the prompt and
the answer positions) to host memory here, keyed by the position keys of what it holds (token ids; an image's
positions by a code of the image's content hash). The next request looks up the entry sharing the longest
common prefix with its own keys, restores that much (``Decoder.kv_write``) and prefills only the rest.
Correctness first: the match is cut at the first differing key (a re-rendered earlier turn, a re-tokenised
answer), and at least the last prompt token is always prefilled (its logits start the answer).

Bounded by bytes (the KV arrays and the keys), least recently used entries go first; an entry larger than the
whole budget is not stored; an entry whose keys are a prefix of a newer one is dropped (the newer covers it).
``max_bytes = 0`` turns it off. Thread-safe. Stats: entries, bytes, max_bytes, hits, misses, reused_tokens.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

__all__ = ["PrefixCache"]


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int64 arrays."""
    m = min(a.size, b.size)
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


class PrefixCache:
    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the prefix cache size must be a non-negative number of bytes, got {max_bytes!r}")
        self.max_bytes, self.bytes = max_bytes, 0
        self.hits = self.misses = self.reused_tokens = 0
        self._items: OrderedDict[int, tuple[np.ndarray, list[np.ndarray], int]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def match(self, keys: Sequence[int], limit: int) -> tuple[int, list[np.ndarray] | None]:
        """(n, KV arrays of the first n positions) of the entry sharing the longest prefix with ``keys[:limit]``;
        (0, None) when none shares one. Counts a hit or a miss."""
        k = np.asarray(keys, np.int64)[: max(int(limit), 0)]
        with self._lock:
            best, n = None, 0
            for i, (ek, _, _) in self._items.items():
                c = _common(ek, k)
                if c > n:
                    best, n = i, c
            if best is None:
                self.misses += 1
                return 0, None
            self._items.move_to_end(best)
            self.hits += 1
            self.reused_tokens += n
            arrays = self._items[best][1]
        return n, [a[:, :, :n] for a in arrays]

    def covers(self, keys: Sequence[int]) -> bool:
        """Whether an entry already holds ``keys`` (or a longer sequence starting with them)."""
        k = np.asarray(keys, np.int64)
        with self._lock:
            return any(ek.size >= k.size and _common(ek, k) == k.size for ek, _, _ in self._items.values())

    def wants(self, keys: Sequence[int], position_bytes: int) -> bool:
        """Whether a snapshot of ``keys`` (``position_bytes`` of KV each) would be stored: not already covered
        and within the budget. Ask before reading the KV, which costs a copy of the whole sequence."""
        return self.enabled and len(keys) * (position_bytes + 8) <= self.max_bytes and not self.covers(keys)

    def put(self, keys: Sequence[int], arrays: list[np.ndarray]) -> bool:
        """Store the KV ``arrays`` ([1, KVH, n, Hd] each) of the positions ``keys`` (n of them); False when the
        entry alone exceeds the budget."""
        k = np.array(keys, np.int64)
        if any(a.shape[2] != k.size for a in arrays):
            raise ValueError(f"KV arrays of {[a.shape[2] for a in arrays][:1]} positions for {k.size} keys")
        size = k.nbytes + sum(int(a.nbytes) for a in arrays)
        if not k.size or size > self.max_bytes:
            return False
        with self._lock:
            for i, (ek, _, esize) in list(self._items.items()):
                if ek.size <= k.size and _common(ek, k) == ek.size:      # covered by the new entry
                    del self._items[i]
                    self.bytes -= esize
            self._next += 1
            self._items[self._next] = (k, arrays, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, _, esize) = self._items.popitem(last=False)
                self.bytes -= esize
        return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}
