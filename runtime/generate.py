"""Text generation on an exported decoder: the loop (prefill, decode one token, the text stream), nothing else.

Supported: one sequence at a time (batch 1), greedy or temperature / top-k / top-p sampling with a seeded
numpy Generator, EOS ids, stop strings, incremental UTF-8-safe detokenization, and a grammar constraint
(``constraint=``, a ``grammar.Constraint``: JSON Schema, regex, Lark) that masks the logits before picking.
Split as gpt-fast does: :func:`prefill`, :func:`decode_one_token`, :func:`decode_n_tokens`, :func:`generate` / :func:`stream`.
The loop talks to any *decoder* with ``prefill(embeds)``, ``decode_one_token(embed)``, ``reset()``,
``capacity``, ``length`` and ``hidden_size`` (``backends/base.py``: ``Decoder``); the backends provide
them (``backends/ort.py``: ``OrtDecoder``, ``backends/trt.py``: ``TrtDecoder``).

Context policy: the cache holds the prompt and every generated token but the last, so a prompt of S tokens
leaves room for ``C - S + 1`` new tokens. A prompt longer than C raises ``ContextError`` before any
work; a ``max_new_tokens`` beyond the room is clamped, and the result's ``finish_reason`` is then
``"context"`` if the clamp ended generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .backends.base import ContextError

__all__ = ["GenerationResult", "Timings", "TextStream", "Progress", "budget", "picker", "timings",
           "embed_prompt", "sample", "prefill", "decode_one_token",
           "decode_n_tokens", "generate", "stream"]


# ---------------------------------------------------------------------------------------------------------
def embed_prompt(embed_table: np.ndarray, input_ids: np.ndarray, image_token_id: int | None = None,
                 image_features: np.ndarray | None = None, dtype=None) -> np.ndarray:
    """Prompt embeddings [S, D]: table rows for the ids, image features spliced in at image-token positions."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= embed_table.shape[0]):
        raise ValueError(f"token id out of the vocabulary of {embed_table.shape[0]}")
    out = np.asarray(embed_table[ids], dtype=dtype or embed_table.dtype)          # [S, D]
    slots = np.flatnonzero(ids == image_token_id) if image_token_id is not None else np.zeros(0, np.int64)
    if image_features is None:
        if slots.size:
            raise ValueError(f"prompt has {slots.size} image positions but no image features were given")
        return out
    feats = np.asarray(image_features).reshape(-1, embed_table.shape[1])         # [N, D]
    if feats.shape[0] != slots.size:
        raise ValueError(f"prompt has {slots.size} image positions, image features have {feats.shape[0]}")
    out[slots] = feats
    return out


def sample(logits: np.ndarray, rng: np.random.Generator | None = None, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None) -> int:
    """Next token from logits [V]: argmax when ``temperature <= 0``, else top-k / top-p sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    x = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None and 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p is not None and 0.0 < top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]          # mass of strictly more likely tokens
        p[order[before >= top_p]] = 0.0                  # keep the smallest head reaching top_p
        p /= p.sum()
    u = (rng if rng is not None else np.random.default_rng()).random()
    return int(min(np.searchsorted(np.cumsum(p), u, side="right"), p.size - 1))


def prefill(decoder, prompt_embeds: np.ndarray) -> np.ndarray:
    """Run the prompt; returns the logits [V] that pick the first new token."""
    return decoder.prefill(prompt_embeds)


def decode_one_token(decoder, embed_table: np.ndarray, token: int) -> np.ndarray:
    """Feed one token (gathered from the embedding table) and return the next logits [V]."""
    return decoder.decode_one_token(embed_table[token])


def decode_n_tokens(decoder, embed_table: np.ndarray, token: int, n: int,
                    pick: Callable[[np.ndarray], int]) -> Iterator[int]:
    """Feed ``token``, then each picked token, yielding up to ``n`` new ids; the caller may stop early."""
    for _ in range(n):
        token = pick(decode_one_token(decoder, embed_table, token))
        yield token


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timings:
    prefill_s: float         # prompt through the graph + first token picked
    decode_s: float          # every later token
    tokens_per_s: float      # decode steps per second (tokens after the first / decode_s)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]     # generated ids, including an EOS id that ended generation
    text: str                # decoded text, special tokens skipped, cut before a stop string
    finish_reason: str       # "eos" | "stop" | "length" (max_new_tokens) | "context" (capacity reached)
    timings: Timings
    prompt_tokens: int


def _byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of the byte-fallback tokens ``<0x00>``..``<0xFF>`` when the decoder has a ``ByteFallback`` step
    (SentencePiece-style vocabularies: Llama-2, Mistral); empty otherwise (byte-level BPE, test doubles)."""
    decoder = getattr(tokenizer, "decoder", None)
    try:
        state = decoder.__getstate__() if decoder is not None else b""
    except Exception:                       # not a tokenizers decoder
        return frozenset()
    if b'"ByteFallback"' not in state:
        return frozenset()
    ids = (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops (added tokens marked special)."""
    try:
        return frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
    except AttributeError:
        return frozenset()


class _Detokenizer:
    """Incremental decoding whose pieces add up to ``tokenizer.decode(all ids, skip_special_tokens=True)``.

    The prefix-offset method: decode the ids since the last emission plus one token of left context, emit
    what is new, and hold back text ending in U+FFFD (half a UTF-8 character of byte-level BPE tokens).
    SentencePiece byte fallback needs more: the ``ByteFallback`` decoder turns a whole *run* of consecutive
    byte tokens into U+FFFD per byte when the run is not valid UTF-8, ASCII bytes included (``<0x56>``
    alone is "V", ``<0x56><0x92>`` is two U+FFFD). So text is held while the last token that reaches the
    decoder (skipped specials do not: they are removed first) is a byte token, until the run ends.
    """

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0
        self.byte_ids = _byte_fallback_ids(tokenizer)
        self.skipped = _special_ids(tokenizer) if self.byte_ids else frozenset()
        self.in_run = False                   # the last decoder-visible token is a byte-fallback token

    def push(self, token: int) -> str:
        token = int(token)
        self.ids.append(token)
        if self.byte_ids and token not in self.skipped:
            self.in_run = token in self.byte_ids
        if self.in_run:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        self.in_run = False
        return after[len(before):]


def budget(prompt_len: int, capacity: int, max_new_tokens: int) -> tuple[int, bool]:
    """(tokens one sequence may generate, whether ``max_new_tokens`` was clamped to the room) for a prompt of
    ``prompt_len`` tokens in a cache of ``capacity``; ValueError / ContextError before any work."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if prompt_len > capacity:
        raise ContextError(f"prompt of {prompt_len} tokens exceeds the context capacity of {capacity} tokens")
    room = capacity - prompt_len + 1
    return min(max_new_tokens, room), max_new_tokens > room


def picker(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, constraint=None) -> Callable[[np.ndarray], int]:
    """One sequence's ``logits -> token``: :func:`sample` with its own Generator seeded by ``seed``.

    With a ``constraint`` (``grammar.Constraint``) the logits are masked to the tokens the grammar allows
    before greedy or sampled picking, and the picked token advances the constraint; without one the picker
    is the plain sampler (no extra work per token)."""
    rng = np.random.default_rng(seed)
    if constraint is None:
        return lambda logits: sample(logits, rng, temperature, top_k, top_p)

    def pick(logits: np.ndarray) -> int:
        token = sample(constraint.apply(logits), rng, temperature, top_k, top_p)
        constraint.advance(token)
        return token
    return pick


def timings(prefill_s: float, decode_s: float, n_tokens: int) -> Timings:
    return Timings(prefill_s=prefill_s, decode_s=decode_s,
                   tokens_per_s=(n_tokens - 1) / decode_s if decode_s > 0 and n_tokens > 1 else 0.0)


class Progress:
    """One sequence's generated tokens turned into text: detokenization, EOS, stop strings, the budget.

    :meth:`feed` takes each picked token and returns the text it releases (text that may start a stop string
    is held back); ``reason`` is set once the sequence is done ("eos" | "stop" | "length" | "context").
    Shared by :class:`TextStream` (one sequence) and ``scheduler.Scheduler`` (many), so both end sequences alike.
    With a ``constraint`` (the one the sequence's :func:`picker` advances), the sequence ends with "eos" as soon
    as the grammar is complete (``constraint.done``: only EOS could follow); stop strings still apply.
    """

    def __init__(self, tokenizer, budget: int, clamped: bool, eos: frozenset[int], stops: Sequence[str],
                 constraint=None):
        self.detok, self.budget, self.clamped, self.eos = _Detokenizer(tokenizer), budget, clamped, eos
        self.constraint = constraint
        self.stops = [s for s in stops if s]
        self._longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text, self.sent, self.reason = "", 0, None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, token: int) -> str:
        if self.reason:
            raise RuntimeError("the sequence has finished")
        token = int(token)
        self.ids.append(token)
        last, detok, reason = len(self.ids) >= self.budget, self.detok, None
        if token in self.eos:
            reason, piece = "eos", detok.flush()
        elif self.constraint is not None and self.constraint.done:
            reason, piece = "eos", detok.push(token) + detok.flush()
        else:
            piece = detok.push(token) + (detok.flush() if last else "")
        text = self.text + piece
        # a stop string not seen before must end inside the new piece: search only that tail
        start = max(0, len(text) - len(piece) - self._longest_stop + 1)
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and last:
            reason = "context" if self.clamped else "length"
        end = len(text) if reason else len(text) - self._held_back(text)
        out, self.sent = text[self.sent:end], max(self.sent, end)
        self.text, self.reason = text, reason
        return out


class TextStream:
    """Iterate to get text pieces as they are generated; ``.result`` holds the :class:`GenerationResult` after.

    ``on_token(token_id, piece)`` is called for every generated token with the text it released (possibly
    "", e.g. half a UTF-8 character, or text held back because it may start a stop string).
    """

    def __init__(self, decoder, embed_table: np.ndarray, prompt_embeds: np.ndarray, *, tokenizer,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, on_token: Callable[[int, str], None] | None = None, constraint=None):
        prompt_len = int(np.shape(prompt_embeds)[-2])                    # [S, D] or [1, S, D]
        self.budget, self.clamped = budget(prompt_len, decoder.capacity, max_new_tokens)
        self.decoder, self.table, self.prompt, self.tok = decoder, embed_table, prompt_embeds, tokenizer
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.stops = [s for s in stop_strings if s]
        self.pick = picker(temperature, top_k, top_p, seed, constraint)
        self.constraint = constraint
        self.on_token, self.prompt_len = on_token, prompt_len
        self._result: GenerationResult | None = None
        self._started = False

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a TextStream can be iterated once")
        self._started = True
        prog = Progress(self.tok, self.budget, self.clamped, self.eos, self.stops, self.constraint)
        t0 = time.perf_counter()
        token = self.pick(prefill(self.decoder, self.prompt))
        t1 = time.perf_counter()
        tokens = decode_n_tokens(self.decoder, self.table, token, self.budget - 1, self.pick)
        while True:
            out = prog.feed(token)
            if self.on_token is not None:
                self.on_token(token, out)
            if out:
                yield out
            if prog.reason:
                break
            token = next(tokens)
        decode_s = time.perf_counter() - t1
        self._result = GenerationResult(
            token_ids=prog.ids, text=prog.text, finish_reason=prog.reason, prompt_tokens=self.prompt_len,
            timings=timings(t1 - t0, decode_s, len(prog.ids)))


def stream(decoder, embed_table: np.ndarray, prompt_embeds: np.ndarray, **kw) -> TextStream:
    """A :class:`TextStream` (same keyword arguments as :func:`generate`); checks the context at once."""
    return TextStream(decoder, embed_table, prompt_embeds, **kw)


def generate(decoder, embed_table: np.ndarray, prompt_embeds: np.ndarray, *, max_new_tokens: int,
             eos_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, on_token: Callable[[int, str], None] | None = None,
             constraint=None) -> GenerationResult:
    """Generate from prompt embeddings [S, D] until EOS, a stop string, ``max_new_tokens``, the context end or
    (with a ``grammar.Constraint``) the grammar's end."""
    s = TextStream(decoder, embed_table, prompt_embeds, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                   eos_token_ids=eos_token_ids, stop_strings=stop_strings, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, on_token=on_token, constraint=constraint)
    for _ in s:
        pass
    return s.result
