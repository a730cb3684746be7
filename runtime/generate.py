"""Text generation on the exported decoder: ONNX Runtime session with a preallocated KV cache, sampling, streaming.

Supported: one sequence at a time (batch 1), greedy or temperature / top-k / top-p sampling with a seeded
numpy Generator, EOS ids, stop strings, incremental UTF-8-safe detokenization. Split as gpt-fast does:
:func:`prefill`, :func:`decode_one_token`, :func:`decode_n_tokens`, :func:`generate` / :func:`stream`.
The loop talks to a *decoder* object with ``prefill(embeds)``, ``decode_one_token(embed)``, ``reset()``,
``capacity``, ``length`` and ``hidden_size``; :class:`OrtDecoder` is the ONNX Runtime one.

KV cache design (see ``export/decoder.py`` for the graph): the graph reads ``past`` [1, KVH, P, Hd] and
writes ``present`` [1, KVH, P+S, Hd] = past followed by the new keys. ORT binds outputs with their exact
shape, and a [1, KVH, L, Hd] tensor is contiguous only when its rows are packed for that very L, so a
present cannot be a strided view into a capacity-sized [1, KVH, C, Hd] buffer. Instead each layer's key
and value owns two flat *arenas* of KVH*C*Hd elements (C = capacity); a length-L tensor is the first
KVH*L*Hd elements of an arena, viewed as [1, KVH, L, Hd]. Step t binds past = arena set A (length P) and
present = arena set B (length P+S); step t+1 swaps them (ping-pong). Nothing is allocated per step: ORT
writes straight into the arenas and the logits into a preallocated [1, 1, V] buffer.

Trade-offs: two arena sets hold twice the cache memory (LLaVA-1.5-7B fp16 at C = 4096: 2 x 2.1 GB), and
the graph's Concat rewrites the whole cache every step (reads P, writes P+1 rows per layer): that copy is
as large as the attention's own read of the cache, small against the weight read while P is short, and
:func:`kv_update_costs` measures both. An in-place cache (graph writes only the new row at an offset)
would remove the copy and the second arena, but needs a different graph (ScatterND or a TensorRT KV
plugin); this graph stays plain ONNX that ORT and TensorRT both parse.

Context policy: the cache holds the prompt and every generated token but the last, so a prompt of S tokens
leaves room for ``C - S + 1`` new tokens. A prompt longer than C raises :class:`ContextError` before any
work; a ``max_new_tokens`` beyond the room is clamped, and the result's ``finish_reason`` is then
``"context"`` if the clamp ended generation.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = ["ContextError", "KVSpec", "OrtDecoder", "GenerationResult", "Timings", "TextStream", "embed_prompt",
           "sample", "prefill", "decode_one_token", "decode_n_tokens", "generate", "stream", "kv_update_costs"]


class ContextError(ValueError):
    """The prompt does not fit the decoder's context capacity."""


@dataclass(frozen=True)
class KVSpec:
    """KV-cache layout of a decoder graph, as the manifest's ``graphs.decoder.kv`` states it."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"

    @classmethod
    def from_manifest(cls, kv: dict) -> "KVSpec":
        return cls(**{k: kv[k] for k in cls.__dataclass_fields__ if k in kv})


# ---------------------------------------------------------------------------------------------------------
class OrtDecoder:
    """ONNX Runtime decoder session with a preallocated, I/O-bound ping-pong KV cache (module docstring).

    ``capacity`` is the most tokens the cache holds (prompt + generated); at most the model's context
    length. ``device="cuda"`` puts the arenas in GPU memory (needs onnxruntime-gpu and the CUDA provider).
    """

    def __init__(self, onnx_path: str | Path, kv: KVSpec, *, capacity: int, providers: Sequence | None = None,
                 session_options=None, device: str = "cpu", weights_bytes: int | None = None):
        import onnxruntime as ort

        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device '{device}' (supported: cpu, cuda)")
        providers = list(providers or (["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]))
        self.session = ort.InferenceSession(str(onnx_path), session_options, providers=providers)
        self.kv, self.capacity, self.device = kv, int(capacity), device
        self.dtype = np.dtype(kv.dtype)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.hidden_size = int(inputs["inputs_embeds"].shape[-1])
        self.vocab_size = int(outputs["logits"].shape[-1])
        L, H, D = kv.num_layers, kv.num_kv_heads, kv.head_dim
        self._names = [(kv.past_key.format(i=i), kv.present_key.format(i=i)) for i in range(L)] + \
                      [(kv.past_value.format(i=i), kv.present_value.format(i=i)) for i in range(L)]
        missing = [p for p, _ in self._names if p not in inputs] + [o for _, o in self._names if o not in outputs]
        if missing:
            raise ValueError(f"decoder graph lacks the KV tensors {', '.join(missing[:4])}")
        self._slab = H * self.capacity * D                                  # elements per arena
        if device == "cpu":
            self._arena = np.zeros((2, 2 * L, self._slab), self.dtype)       # [set, layer k/v, KVH*C*Hd]
            self._ptr = [[self._arena[s, j].ctypes.data for j in range(2 * L)] for s in range(2)]
        else:
            self._arena = [[ort.OrtValue.ortvalue_from_shape_and_type([self._slab], self.dtype.type, "cuda", 0)
                            for _ in range(2 * L)] for _ in range(2)]
            self._ptr = [[v.data_ptr() for v in row] for row in self._arena]
        self._mask = np.ones((1, self.capacity), np.int64)                 # attention_mask [1, P+S] = prefix
        self._pos = np.arange(self.capacity, dtype=np.int64)[None]          # position_ids [1, S] = a slice
        self._logits = np.zeros((1, 1, self.vocab_size), self.dtype)       # logits [1, 1, V]
        self._token = np.zeros((1, 1, self.hidden_size), self.dtype)       # one token's embedding [1, 1, D]
        self._io = self.session.io_binding()
        self._io.bind_output("logits", "cpu", 0, self.dtype, list(self._logits.shape), self._logits.ctypes.data)
        self.weights_bytes = weights_bytes
        self._cur, self.length = 0, 0

    @classmethod
    def from_manifest(cls, root: str | Path, graph: dict, *, capacity: int | None = None,
                      context_length: int | None = None, **kw) -> "OrtDecoder":
        """From a bundle folder and its ``graphs.decoder`` entry; capacity defaults to the context length."""
        root = Path(root)
        cap = capacity or context_length
        if cap is None:
            raise ValueError("give capacity or the model's context_length")
        if context_length is not None and cap > context_length:
            raise ContextError(f"capacity {cap} exceeds the model's context length {context_length}")
        size = sum(os.path.getsize(root / f) for f in (graph["file"], graph.get("data")) if f)
        return cls(root / graph["file"], KVSpec.from_manifest(graph["kv"]), capacity=cap, weights_bytes=size, **kw)

    def reset(self, length: int = 0) -> None:
        """Forget the cache. ``length > 0`` pretends that many (stale) positions are cached: benchmarks only."""
        if not 0 <= length <= self.capacity:
            raise ContextError(f"length {length} outside the cache capacity {self.capacity}")
        self._cur, self.length = 0, int(length)

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the cached key and value of ``layer``: [1, KVH, length, Hd] each (CPU arenas only)."""
        if self.device != "cpu":
            raise ValueError("cache views need CPU arenas")
        shape = (1, self.kv.num_kv_heads, self.length, self.kv.head_dim)
        n = int(np.prod(shape))
        a = self._arena[self._cur]
        return a[layer, :n].reshape(shape), a[self.kv.num_layers + layer, :n].reshape(shape)

    def _bind(self, x: np.ndarray) -> int:
        """Bind one call's inputs and outputs; ``x`` [1, S, D] must stay alive until the run. Returns P+S."""
        P, S = self.length, x.shape[1]
        if P + S > self.capacity:
            raise ContextError(f"{P} cached + {S} new tokens exceed the cache capacity {self.capacity}")
        io, dt, dev = self._io, self.dtype, self.device
        io.bind_input("inputs_embeds", "cpu", 0, dt, [1, S, self.hidden_size], x.ctypes.data)
        io.bind_input("attention_mask", "cpu", 0, np.int64, [1, P + S], self._mask.ctypes.data)
        io.bind_input("position_ids", "cpu", 0, np.int64, [1, S], self._pos.ctypes.data + 8 * P)
        past_shape = [1, self.kv.num_kv_heads, P, self.kv.head_dim]
        present_shape = [1, self.kv.num_kv_heads, P + S, self.kv.head_dim]
        src, dst = self._ptr[self._cur], self._ptr[1 - self._cur]
        for j, (past, present) in enumerate(self._names):
            io.bind_input(past, dev, 0, dt, past_shape, src[j])
            io.bind_output(present, dev, 0, dt, present_shape, dst[j])
        return P + S

    def _run(self, x: np.ndarray) -> np.ndarray:
        total = self._bind(x)
        self.session.run_with_iobinding(self._io)
        self._cur, self.length = 1 - self._cur, total
        return self._logits[0, 0]

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Run the prompt [S, D] (or [1, S, D]) on an empty cache; returns the last logits [V] (a view)."""
        x = np.asarray(inputs_embeds)
        x = np.ascontiguousarray(x.reshape(1, -1, x.shape[-1]), dtype=self.dtype)   # [1, S, D]
        if x.shape[-1] != self.hidden_size or x.shape[1] < 1:
            raise ValueError(f"prompt embeddings must be [S, {self.hidden_size}], got {np.shape(inputs_embeds)}")
        self.reset()
        return self._run(x)

    def decode_one_token(self, token_embeds: np.ndarray) -> np.ndarray:
        """Append one token's embedding [D] to the cache; returns the next logits [V] (a view)."""
        self._token.reshape(-1)[:] = np.asarray(token_embeds).reshape(-1)
        return self._run(self._token)


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


class TextStream:
    """Iterate to get text pieces as they are generated; ``.result`` holds the :class:`GenerationResult` after.

    ``on_token(token_id, piece)`` is called for every generated token with the text it released (possibly
    "", e.g. half a UTF-8 character, or text held back because it may start a stop string).
    """

    def __init__(self, decoder, embed_table: np.ndarray, prompt_embeds: np.ndarray, *, tokenizer,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, on_token: Callable[[int, str], None] | None = None):
        prompt_len = int(np.shape(prompt_embeds)[-2])                    # [S, D] or [1, S, D]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if prompt_len > decoder.capacity:
            raise ContextError(f"prompt of {prompt_len} tokens exceeds the context capacity of "
                               f"{decoder.capacity} tokens")
        room = decoder.capacity - prompt_len + 1
        self.budget, self.clamped = min(max_new_tokens, room), max_new_tokens > room
        self.decoder, self.table, self.prompt, self.tok = decoder, embed_table, prompt_embeds, tokenizer
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.stops = [s for s in stop_strings if s]
        self._longest_stop = max((len(s) for s in self.stops), default=0)
        rng = np.random.default_rng(seed)
        self.pick = lambda logits: sample(logits, rng, temperature, top_k, top_p)
        self.on_token, self.prompt_len = on_token, prompt_len
        self._result: GenerationResult | None = None
        self._started = False

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a TextStream can be iterated once")
        self._started = True
        detok, ids, text, sent, reason = _Detokenizer(self.tok), [], "", 0, None
        t0 = time.perf_counter()
        token = self.pick(prefill(self.decoder, self.prompt))
        t1 = time.perf_counter()
        tokens = decode_n_tokens(self.decoder, self.table, token, self.budget - 1, self.pick)
        while True:
            ids.append(token)
            last = len(ids) >= self.budget
            if token in self.eos:
                reason, piece = "eos", detok.flush()
            else:
                piece = detok.push(token) + (detok.flush() if last else "")
            text += piece
            # a stop string not seen before must end inside the new piece: search only that tail
            start = max(0, len(text) - len(piece) - self._longest_stop + 1)
            cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if reason is None and last:
                reason = "context" if self.clamped else "length"
            end = len(text) if reason else len(text) - self._held_back(text)
            out, sent = text[sent:end], max(sent, end)
            if self.on_token is not None:
                self.on_token(token, out)
            if out:
                yield out
            if reason:
                break
            token = next(tokens)
        decode_s = time.perf_counter() - t1
        self._result = GenerationResult(
            token_ids=ids, text=text, finish_reason=reason, prompt_tokens=self.prompt_len,
            timings=Timings(prefill_s=t1 - t0, decode_s=decode_s,
                            tokens_per_s=(len(ids) - 1) / decode_s if decode_s > 0 and len(ids) > 1 else 0.0))


def stream(decoder, embed_table: np.ndarray, prompt_embeds: np.ndarray, **kw) -> TextStream:
    """A :class:`TextStream` (same keyword arguments as :func:`generate`); checks the context at once."""
    return TextStream(decoder, embed_table, prompt_embeds, **kw)


def generate(decoder, embed_table: np.ndarray, prompt_embeds: np.ndarray, *, max_new_tokens: int,
             eos_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
    """Generate from prompt embeddings [S, D] until EOS, a stop string, ``max_new_tokens`` or the context end."""
    s = TextStream(decoder, embed_table, prompt_embeds, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                   eos_token_ids=eos_token_ids, stop_strings=stop_strings, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, on_token=on_token)
    for _ in s:
        pass
    return s.result


# ---------------------------------------------------------------------------------------------------------
def _best_of(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kv_update_costs(decoder: OrtDecoder, lengths: Sequence[int] = (0, 256, 1024), repeats: int = 5) -> dict:
    """Per decode step at each cache length P: the step, its cache update, and a weight-read estimate.

    Returns lists aligned with ``lengths`` (seconds, best of ``repeats``):

    * ``step_s``: one :meth:`OrtDecoder.decode_one_token` at P (cache content is stale: timing only);
    * ``bind_s``: rebinding the 4L+3 inputs/outputs for that step (Python + ORT binding overhead);
    * ``kv_copy_s``: a host memcpy of what the graph's Concat moves per step (past -> present, all layers);
      ``kv_bytes``: its size;
    * ``weights_bytes`` and ``weights_copy_s``: the graph's weight bytes and the time one memcpy of that many
      bytes takes at the measured copy bandwidth (a lower bound on the per-step weight read);
    * ``copy_GBps``: that bandwidth.

    CPU arenas only (on a GPU the copies are device-side; time ``step_s`` there instead).
    """
    if decoder.device != "cpu":
        raise ValueError("kv_update_costs measures host copies: use a CPU decoder")
    kv, out = decoder.kv, {"lengths": [], "step_s": [], "bind_s": [], "kv_copy_s": [], "kv_bytes": []}
    probe = np.zeros(decoder.hidden_size, decoder.dtype)
    for P in lengths:
        if not 0 <= P < decoder.capacity:
            raise ContextError(f"length {P} must be below the cache capacity {decoder.capacity}")

        def step():
            decoder.reset(P)
            decoder.decode_one_token(probe)

        def bind():
            decoder.reset(P)
            decoder._bind(decoder._token)

        n = kv.num_kv_heads * P * kv.head_dim
        src, dst = decoder._arena[0, :, :n], decoder._arena[1, :, :n]
        step()                                                                # warm-up
        out["lengths"].append(int(P))
        out["step_s"].append(_best_of(step, repeats))
        out["bind_s"].append(_best_of(bind, repeats))
        out["kv_copy_s"].append(_best_of(lambda: np.copyto(dst, src), repeats))
        out["kv_bytes"].append(int(src.nbytes))
    decoder.reset()
    buf = np.ones(16 << 20, np.uint8)
    dst = np.empty_like(buf)
    bw = buf.nbytes / _best_of(lambda: np.copyto(dst, buf), repeats)
    wb = int(decoder.weights_bytes or 0)
    out.update(weights_bytes=wb, weights_copy_s=wb / bw, copy_GBps=bw / 1e9)
    return out
