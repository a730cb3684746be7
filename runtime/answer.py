"""What one request answers: :class:`Answer` (the result) and :class:`AnswerStream` (its text as it is generated).

Kept apart from ``pipeline.py`` so that ``chat.py`` (conversations) builds on them without importing the
pipeline, which makes conversations (``Pipeline.chat``). ``pipeline`` re-exports every name here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .gate import Verdict

__all__ = ["Answer", "AnswerStream", "GenerationUnavailable", "ms"]


class GenerationUnavailable(RuntimeError):
    """The bundle has no language model (exported with --no-decoder)."""


@dataclass(frozen=True)
class Answer:
    text: str
    verdict: Verdict | None          # None for a text-only prompt (not gated)
    policy: str
    action: str                      # generated | instructed | refused | annotated
    finish_reason: str               # eos | stop | length | context | refused
    backend: str
    timings: dict = field(default_factory=dict)
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0

    def to_json(self) -> dict:
        return {"text": self.text, "verdict": None if self.verdict is None else self.verdict.to_json(),
                "policy": self.policy, "action": self.action, "finish_reason": self.finish_reason,
                "backend": self.backend, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.token_ids), "timings": self.timings}


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to the microsecond (every timing an answer reports)."""
    return round(seconds * 1e3, 3)


class AnswerStream:
    """One request, already gated (``.verdict``) and planned (``.action``); iterate for the text pieces.

    ``Chat.ask`` (every request's route) does the work before this object exists (image read, gate, policy, prompt), so
    its errors (unreadable image, prompt too long for the context) come before any language-model work;
    the constructor only keeps what it is given. Iterating holds the language model's lock for one decoder step at
    a time, never across a ``yield``: an abandoned stream blocks nobody, and if another request used the
    decoder meanwhile, this one rebuilds its cache before its next step (``lease.DecoderLease``).
    """

    def __init__(self, pipe, *, verdict: Verdict | None, policy: str, action: str, timings: dict,
                 t0: float, refusal: str | None = None, text_stream=None):
        self.pipe, self.verdict, self.policy, self.action = pipe, verdict, policy, action
        self.timings, self.refusal, self._text_stream, self._t0 = timings, refusal, text_stream, t0

    def __iter__(self) -> Iterator[str]:
        if self.refusal is not None:
            yield self.refusal
            return
        yield from self._text_stream              # each decoder step takes the model's lock (lease.py)
        r = self._text_stream.result
        self.timings.update(prefill_ms=ms(r.timings.prefill_s), decode_ms=ms(r.timings.decode_s),
                            decode_tokens_per_s=round(r.timings.tokens_per_s, 2),
                            ttft_ms=ms(self.timings.get("preprocess_ms", 0) / 1e3 +
                                        (self.timings.get("vision_gate_ms") or 0) / 1e3 + r.timings.prefill_s),
                            total_ms=ms(time.perf_counter() - self._t0))

    def cancel(self) -> None:
        """Stop an unfinished answer decoded in a scheduler's batch: its sequence leaves at the next step. (A
        one-sequence answer holds the decoder only during a step: dropping the stream is enough.)"""
        cancel = getattr(self._text_stream, "cancel", None)
        if cancel is not None:
            cancel()

    @property
    def result(self) -> Answer:
        if self.refusal is not None:
            return Answer(self.refusal, self.verdict, self.policy, "refused", "refused", self.pipe.backend,
                          dict(self.timings))
        r = self._text_stream.result
        return Answer(r.text, self.verdict, self.policy, self.action, r.finish_reason, self.pipe.backend,
                      dict(self.timings), tuple(r.token_ids), r.prompt_tokens)
