"""A conversation on one :class:`~safeclip.runtime.pipeline.Pipeline`: system prompt, user and assistant turns,
several images across turns, every image gated, the KV cache reused from turn to turn.

    chat = pipe.chat(system="You are a kind museum guide.")
    for piece in (s := chat.ask("What is this?", image="photo.jpg")):
        print(piece, end="")
    s.result.verdicts                       # every image of the conversation, in order
    chat.ask("How old is it?").result.text  # the same image, no second vision pass, only the new tokens prefilled
    chat.history                            # the messages as rendered; chat.reset() starts over

Rendering: the whole history goes through the bundle's own chat template (``prompt.render_messages``, as
transformers' ``apply_chat_template`` renders it), every content a list of parts, each image placeholder
expanded to the positions its image takes (fixed for LLaVA-1.5, by image size for anyres).

KV reuse: the cache holds the last sequence this conversation ran. A new turn compares the new token sequence
(image positions compared by image content) with it: the cache is cut back to the longest common prefix
(``Decoder.truncate``: the template may re-render an earlier turn differently from the tokens generated) and
only the tokens after it are prefilled (``Decoder.extend``). If another request used the decoder in between,
the whole sequence is prefilled again. The language model's lock is taken per decoder step, never across a
yield (``lease.py``).
With a ``prefix_cache`` (``prefix_cache.PrefixCache``, the server's), a finished turn's KV is snapshotted there
(``Decoder.kv_read``) and a conversation whose keys share a longer prefix with a snapshot than with the
decoder's own cache restores it (``Decoder.kv_write``): how a stateless client's re-sent history is not paid
for twice. Image positions are keyed by a code of the image's content hash, the same in every conversation.

History: ``set_history(turns)`` replaces the conversation by ``(question, images, answer)`` turns a stateless
client re-sends (the server); their images are gated by the next ``ask`` like its own, after its context check.

Images: features and verdicts are cached by content hash (sha256 of the file bytes, or of a PIL image's
pixels, and ``max_pixels``) in the pipeline's bounded LRU :class:`ImageCache`, so an image sent again
(a stateless client re-sending its history) costs no second vision pass. A flagged image applies the turn's
policy: ``instruct`` puts the safety instruction right after that image (it stays in the history);
``refuse`` answers that turn with the templated refusal without running the language model, and every later
turn of the conversation is refused too (the language model never sees a refused image: start over);
``annotate`` only reports. The verdicts of all images are on every result.

Context: when history plus the new turn do not fit the decoder's capacity, :class:`ContextError` is raised
before any vision or language-model work; history is never truncated silently (``reset()`` starts over).

Batching: with ``Pipeline.enable_batching`` a turn is decoded by the pipeline's ``scheduler.Scheduler`` with the
other requests, in its own KV slot: the decoder's one-sequence cache is not used, but the ``prefix_cache`` is
(the scheduler restores the longest snapshotted prefix into the slot and snapshots the finished turn).

A turn joins the history when its stream has been iterated to the end (a refused turn at once); asking again
before that drops the unfinished turn.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .answer import Answer, AnswerStream, GenerationUnavailable, ms
from .backends.base import ContextError
from .gate import Verdict, check_policy
from .image import MAX_PIXELS
from .lease import CacheRecord, DecoderLease, SlotTurn

__all__ = ["Chat", "ChatAnswer", "ChatStream", "ImageCache", "image_key"]

DEFAULT_CACHE_BYTES = 256 << 20


def image_key(image, max_pixels: int = MAX_PIXELS) -> str:
    """Content hash of an image source: its bytes (a path's file bytes), or a PIL image's mode, size, pixels."""
    from .image import ImageError

    h = hashlib.sha256()
    if isinstance(image, (str, Path)):
        try:
            h.update(Path(image).read_bytes())
        except OSError as e:
            raise ImageError(f"{Path(image).name}: cannot read file ({e.strerror or e})") from None
    elif isinstance(image, (bytes, bytearray, memoryview)):
        h.update(bytes(image))
    elif hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):
        h.update(f"PIL:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        raise ImageError(f"<{type(image).__name__}>: unsupported image source type (path, bytes or PIL image)")
    h.update(f":{max_pixels}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Image:
    key: str
    features: np.ndarray          # [N, D_lm]
    verdict: Verdict

    @property
    def positions(self) -> int:
        return int(self.features.shape[0])


class ImageCache:
    """Image features and verdicts by content hash; least recently used entries go beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._items: OrderedDict[str, _Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> _Image | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, item: _Image) -> None:
        with self._lock:
            if item.key in self._items:
                return
            self._items[item.key] = item
            self.bytes += item.features.nbytes
            while self.bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.features.nbytes

    def clear(self) -> None:
        """Forget every image (the counters stay)."""
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}


@dataclass
class _Turn:
    text: str
    images: list[_Image]
    policy: str
    instruction: str | None       # the caller's override of the safety instruction
    answer: str = ""


@dataclass(frozen=True)
class ChatAnswer(Answer):
    verdicts: tuple[Verdict, ...] = ()     # every image of the conversation so far, in order
    cached_tokens: int = 0                 # prompt tokens the cache already held (not prefilled again)

    def to_json(self) -> dict:
        return {**super().to_json(), "verdicts": [v.to_json() for v in self.verdicts],
                "cached_tokens": self.cached_tokens}


class ChatStream(AnswerStream):
    """One turn of a :class:`Chat`: iterate for the text pieces; ``.verdict`` (this turn's image, or the image
    that refused it), ``.verdicts`` (every image of the conversation), ``.result`` a :class:`ChatAnswer`."""

    def __init__(self, chat: "Chat", turn: _Turn, turn_id: int, verdicts: tuple[Verdict, ...],
                 lease: DecoderLease | SlotTurn | None, **kw):
        super().__init__(chat.pipe, **kw)
        self.chat, self.turn, self.turn_id, self.verdicts, self.lease = chat, turn, turn_id, verdicts, lease

    def __iter__(self):
        yield from super().__iter__()
        if self.lease is not None:
            self.timings.update(cached_tokens=self.lease.cached, prefill_tokens=self.lease.prefilled)
            self.lease.snapshot()
            self.chat._finish(self.turn_id, self.turn, self._text_stream.result.text)

    @property
    def result(self) -> ChatAnswer:
        base = super().result
        return ChatAnswer(**{f.name: getattr(base, f.name) for f in fields(Answer)}, verdicts=self.verdicts,
                          cached_tokens=0 if self.lease is None else self.lease.cached)


class Chat:
    """A conversation (module docstring). Made by :meth:`Pipeline.chat`."""

    def __init__(self, pipe, system: str | None = None, prefix_cache=None):
        if system is not None and not isinstance(system, str):
            raise ValueError(f"the system prompt must be a string, got {type(system).__name__}")
        self.pipe, self.system, self.prefix_cache = pipe, system, prefix_cache
        self._turns: list[_Turn] = []
        self._pending = 0                                # id of the turn whose stream may still finish
        self._record = CacheRecord()                     # what this chat last put in the decoder's cache
        self._unseen: list[tuple[list, int, np.ndarray, Any]] = []    # history images not gated yet

    # -- history ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self._turns, self._pending, self._unseen = [], self._pending + 1, []

    def undo(self) -> None:
        """Forget the last finished turn (its question, images and answer), e.g. to ask it again; an unfinished
        turn's stream no longer joins the history. The decoder's cache keeps what it holds: the next turn
        reuses the common prefix."""
        if not self._turns:
            raise ValueError("the conversation has no finished turn to undo")
        self._turns.pop()
        self._pending += 1

    def set_history(self, turns: Sequence[tuple[str, Sequence, str]], *, policy: str | None = None,
                    max_pixels: int = MAX_PIXELS) -> None:
        """Replace the conversation by earlier turns, ``(user text, images, assistant answer)`` each, as a
        stateless client re-sends them. Their images are taken from the image cache or gated by the next
        :meth:`ask` (after its context check), like that turn's own; ``policy`` is theirs (default the
        pipeline's). Raises ``ValueError``/``ImageError`` on a bad turn, the chat unchanged."""
        policy = check_policy(policy or self.pipe.policy)
        unseen: list = []
        new = []
        for i, (text, images, answer) in enumerate(turns):
            if not isinstance(text, str) or not isinstance(answer, str):
                raise ValueError(f"history turn {i}: the question and the answer must be strings")
            new.append(_Turn(text, self._gather(list(images), max_pixels, unseen), policy, None, answer))
        self._turns, self._unseen, self._pending = new, unseen, self._pending + 1

    def _gather(self, sources: list, max_pixels: int, pending: list) -> list["_Image"]:
        """The images of ``sources``: cached ones, else placeholders (positions only) listed in ``pending``."""
        cache, images = self.pipe.image_cache, []
        for src in sources:
            key = image_key(src, max_pixels)
            hit = cache.get(key)
            if hit is None:
                pv, size = self.pipe.vision.views(src, max_pixels)
                hit = _Image(key, np.zeros((self.pipe.vision.image_tokens(size), 0), np.float32), None)
                pending.append((images, len(images), pv, size))
            images.append(hit)
        return images

    @property
    def history(self) -> list[dict[str, Any]]:
        """The finished turns as the template renders them (system, user parts, assistant answers)."""
        return self._messages(self._turns)

    @property
    def verdicts(self) -> tuple[Verdict, ...]:
        return tuple(im.verdict for t in self._turns for im in t.images)

    def _user_message(self, turn: _Turn) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        for im in turn.images:
            parts.append({"type": "image"})
            if im.verdict is not None and im.verdict.flagged and turn.policy == "instruct":
                parts.append({"type": "text", "text": self.pipe.instruction_for(im.verdict.category,
                                                                                  turn.instruction)})
        parts.append({"type": "text", "text": turn.text})
        return {"role": "user", "content": parts}

    def _messages(self, turns: Sequence[_Turn], current: _Turn | None = None) -> list[dict[str, Any]]:
        out = [] if self.system is None else [{"role": "system", "content": [{"type": "text", "text": self.system}]}]
        for t in turns:
            out += [self._user_message(t), {"role": "assistant", "content": [{"type": "text", "text": t.answer}]}]
        if current is not None:
            out.append(self._user_message(current))
        return out

    def _finish(self, turn_id: int, turn: _Turn, answer: str) -> None:
        if turn_id == self._pending:
            turn.answer = answer
            self._turns.append(turn)
            self._pending += 1

    # -- tokens ----------------------------------------------------------------------------------------
    def _tokens(self, turn: _Turn) -> tuple[np.ndarray, np.ndarray]:
        """(ids [S] with every image expanded, position keys [S]) of history + ``turn``: one render through the
        chat template and one tokenization."""
        lm = self.pipe.language_model
        images = [im for t in (*self._turns, turn) for im in t.images]
        raw = lm.tokenize(lm.render(self._messages(self._turns, turn)), num_images=len(images))
        slots = np.flatnonzero(raw == lm.image_token_id)
        repeats = np.ones(raw.size, np.int64)
        repeats[slots] = [im.positions for im in images]
        raw_keys = raw.copy()                          # an image's positions: one negative code per content
        raw_keys[slots] = [-(int(im.key[:15], 16) + 1) for im in images]    # the same in every chat
        return np.repeat(raw, repeats), np.repeat(raw_keys, repeats)        # [S], [S]

    def _check_context(self, n: int, reserve: int = 0) -> None:
        cap = self.pipe.language_model.capacity
        if reserve and n + reserve > cap:
            raise ContextError(f"this model's context is {cap} tokens, but the conversation takes {n} tokens and "
                               f"max_tokens asks for {reserve} more ({n + reserve} in all); shorten the "
                               f"conversation or lower max_tokens")
        if n > cap and not self._turns:
            raise ContextError(f"prompt of {n} tokens exceeds the context capacity of {cap} tokens")
        if n > cap:
            raise ContextError(f"conversation of {n} tokens ({len(self._turns)} earlier turns and this one) exceeds "
                               f"the context capacity of {cap} tokens; start a new conversation (reset())")

    # -- a turn ----------------------------------------------------------------------------------------
    def ask(self, text: str, image=None, *, policy: str | None = None, instruction: str | None = None,
            max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
            top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
            max_pixels: int = MAX_PIXELS, reserve: int = 0) -> ChatStream:
        """Ask the next question, with ``image`` (None, one image, or a list of them) before the text.

        Every request takes this route (``Pipeline.stream`` is a one-turn conversation): policy check, images
        (cached or preprocessed), one render + tokenization of the conversation and the context check, the
        vision pass and gate, the policy, then the decoder through a :class:`~.lease.DecoderLease` or the
        pipeline's scheduler. The conversation is rendered a second time only when the gate puts a safety
        instruction into it (its text exists only once an image is flagged).

        Raises here, before any language-model work: an unknown policy, an empty text, an unreadable image,
        a conversation longer than the context, or than the context less ``reserve`` tokens kept for the
        answer (:class:`ContextError`), a bundle without a language model.
        """
        pipe, lm, t0 = self.pipe, self.pipe.language_model, time.perf_counter()
        policy = check_policy(policy or pipe.policy)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the prompt is empty")
        if lm is None:
            raise GenerationUnavailable(f"{pipe.manifest.root}: bundle has no language model "
                                        "(exported with --no-decoder); only gating is available")
        sources = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        timings: dict = {}
        cache, pending = pipe.image_cache, list(self._unseen)
        t1 = time.perf_counter()
        images = self._gather(sources, max_pixels, pending)    # cached, or preprocessed (no vision pass yet)
        total = len(sources) + sum(len(t.images) for t in self._turns)
        timings.update(preprocess_ms=ms(time.perf_counter() - t1), image_cache_hits=total - len(pending))
        turn = _Turn(text, images, policy, instruction)
        ids, keys = self._tokens(turn)
        self._check_context(ids.size, reserve)                       # before the vision pass
        vision_s, done = 0.0, {}
        for where, i, pv, size in pending:               # this turn's images and the history's unseen ones
            key = where[i].key
            if key not in done:
                feats, verdict = pipe.vision.encode_views(pv, size)       # [1, N, D_lm]
                vision_s += verdict.latency_ms / 1e3
                done[key] = _Image(key, np.ascontiguousarray(feats[0]), verdict)
                cache.put(done[key])
            where[i] = done[key]
        self._unseen = []
        timings["vision_gate_ms"] = ms(vision_s) if pending else 0.0
        self._pending += 1
        turn_id = self._pending
        verdicts = self.verdicts + tuple(im.verdict for im in images)
        flagged = [im.verdict for im in images if im.verdict.flagged]
        refusing = [im.verdict for t in self._turns if t.policy == "refuse" for im in t.images if im.verdict.flagged]
        if policy == "refuse":
            refusing += flagged
        own = flagged[0] if flagged else images[0].verdict if images else None
        if refusing:
            v = flagged[0] if policy == "refuse" and flagged else refusing[0]
            refusal = pipe.refusal_for(v.category)
            timings["total_ms"] = ms(time.perf_counter() - t0)
            self._finish(turn_id, turn, refusal)
            return ChatStream(self, turn, turn_id, verdicts, None, verdict=v, policy=policy, action="refused",
                              timings=timings, t0=t0, refusal=refusal)
        instructed = {d.key for d in done.values() if d.verdict.flagged}
        if any(im.key in instructed for t in (*self._turns, turn) if t.policy == "instruct" for im in t.images):
            ids, keys = self._tokens(turn)               # the gate put a safety instruction in: render again
            self._check_context(ids.size, reserve)       # the instruction takes room too
        all_images = [im for t in (*self._turns, turn) for im in t.images]
        feats = np.concatenate([im.features for im in all_images]) if all_images else None
        embeds = lm.embed(ids, feats)                                          # [S, D]
        kw = dict(tokenizer=lm.tokenizer, max_new_tokens=max_new_tokens, eos_token_ids=lm.eos_ids,
                  stop_strings=list(stop), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if pipe.scheduler is not None:                   # scheduler.py: the turn joins the running batch
            stream = pipe.scheduler.submit(embeds, prefix_keys=keys, prefix_cache=self.prefix_cache, **kw)
            lease = SlotTurn(stream, ids.size)
        else:
            from .generate import TextStream

            lease = DecoderLease(lm, keys, self._record, self.prefix_cache)
            stream = TextStream(lease, lm.table, embeds, on_token=lease.on_token, **kw)
        action = ("instructed" if policy == "instruct" else "annotated") if flagged else "generated"
        return ChatStream(self, turn, turn_id, verdicts, lease, verdict=own, policy=policy, action=action,
                          timings=timings, t0=t0, text_stream=stream)
