"""``Pipeline``: a verified bundle, its vision+gate graph and (when present) its language model.

    pipe = Pipeline.load("engines/demo")
    verdict = pipe.gate("photo.jpg")                              # Verdict(flagged, category, score, ...)
    answer = pipe.generate("photo.jpg", "What is in the picture?")  # Answer(text, verdict, policy, timings)
    for piece in (s := pipe.stream("photo.jpg", "Describe it")):  # text as it is generated
        print(piece, end="")
    s.result                                                      # the Answer, once the stream is done

Loading verifies the manifest and every file (see ``manifest.py``) and then checks that the vision graph
really emits the gate output with one probability per manifest class; anything else refuses to serve.

Policies for a flagged image (default from the manifest; a call's ``policy=`` overrides it; the server fixes one):
``instruct`` inserts the safety instruction right after the image, before the user's text (a clean image
gets no extra tokens); ``refuse`` answers with the category's templated refusal and never runs the
language model; ``annotate`` generates as usual and reports the verdict. Text-only prompts are not gated.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .gate import DEFAULT_INSTRUCTION, DEFAULT_REFUSAL, POLICIES, Verdict, verdict_from_probs
from .image import MAX_PIXELS, load_image, preprocess
from .manifest import FEATURES_OUTPUT, GATE_OUTPUT, BundleError, Manifest, load_manifest
from .messages import one_line


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


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class AnswerStream:
    """One request: the gate has run when this object exists (``.verdict``); iterate for the text pieces.

    Errors about the request (unreadable image, prompt too long for the context) are raised when the stream
    is created, before any language-model work.
    """

    def __init__(self, pipe: "Pipeline", image, prompt: str, *, policy: str | None, instruction: str | None,
                 max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                 seed: int | None, stop: Sequence[str], max_pixels: int):
        from .generate import ContextError, TextStream, embed_prompt
        from .prompt import render, tokenize

        t0 = time.perf_counter()
        self.pipe, self.policy = pipe, policy or pipe.policy
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}' (supported: {', '.join(POLICIES)})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        lm = pipe._lm
        has_image = image is not None
        self.timings: dict = {}
        self.verdict: Verdict | None = None
        self.refusal: str | None = None
        self._text_stream = None

        pv = size = None
        if has_image:
            t1 = time.perf_counter()
            pv, size = pipe._views(image, max_pixels)
            self.timings["preprocess_ms"] = _ms(time.perf_counter() - t1)

        def ids_for(instr: str | None) -> np.ndarray:
            text = render(lm.template, prompt, has_image, instr, **lm.special_tokens)
            return tokenize(lm.tokenizer, text, lm.image_token_id, pipe.image_tokens(size),
                            bos_token=lm.special_tokens.get("bos_token"), num_images=int(has_image))

        if lm is not None:
            ids = ids_for(None)
            if ids.size > lm.decoder.capacity:          # before the vision pass and the language model
                raise ContextError(f"prompt of {ids.size} tokens exceeds the context capacity of "
                                   f"{lm.decoder.capacity} tokens")
        feats = None
        if has_image:
            feats, self.verdict = pipe._vision_pass(pv, size)
            self.timings["vision_gate_ms"] = self.verdict.latency_ms
        flagged = self.verdict is not None and self.verdict.flagged
        if flagged and self.policy == "refuse":
            self.action = "refused"
            self.refusal = pipe.refusal_for(self.verdict.category)
            self.timings["total_ms"] = _ms(time.perf_counter() - t0)
            return
        if lm is None:
            raise GenerationUnavailable(f"{pipe.manifest.root}: bundle has no language model "
                                        "(exported with --no-decoder); only gating is available")
        instr = None
        if flagged and self.policy == "instruct":
            instr = pipe.instruction_for(self.verdict.category, instruction)
            ids = ids_for(instr)
        self.action = ("instructed" if instr else "annotated" if flagged else "generated")
        embeds = embed_prompt(lm.table, ids, lm.image_token_id, None if feats is None else feats[0],
                              dtype=lm.decoder.dtype)                          # [S, D]
        self._text_stream = TextStream(lm.decoder, lm.table, embeds, tokenizer=lm.tokenizer,
                                       max_new_tokens=max_new_tokens, eos_token_ids=lm.eos_ids,
                                       stop_strings=list(stop), temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed)
        self._t0 = t0
        self._result: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        if self.refusal is not None:
            yield self.refusal
            return
        with self.pipe._lock:                     # one decoder, one sequence at a time
            for piece in self._text_stream:
                yield piece
        r = self._text_stream.result
        self.timings.update(prefill_ms=_ms(r.timings.prefill_s), decode_ms=_ms(r.timings.decode_s),
                            decode_tokens_per_s=round(r.timings.tokens_per_s, 2),
                            ttft_ms=_ms(self.timings.get("preprocess_ms", 0) / 1e3 +
                                        (self.timings.get("vision_gate_ms") or 0) / 1e3 + r.timings.prefill_s),
                            total_ms=_ms(time.perf_counter() - self._t0))

    @property
    def result(self) -> Answer:
        if self.refusal is not None:
            return Answer(self.refusal, self.verdict, self.policy, "refused", "refused", self.pipe.backend,
                          dict(self.timings))
        r = self._text_stream.result
        return Answer(r.text, self.verdict, self.policy, self.action, r.finish_reason, self.pipe.backend,
                      dict(self.timings), tuple(r.token_ids), r.prompt_tokens)


@dataclass
class _LanguageModel:
    decoder: object
    table: np.ndarray
    tokenizer: object
    template: str
    special_tokens: dict
    image_token_id: int
    image_seq_length: int
    eos_ids: list[int]


class Pipeline:
    def __init__(self, manifest: Manifest, vision, backend: str, lm: _LanguageModel | None = None):
        self.manifest = manifest
        self.vision = vision
        self.backend = backend
        self._lm = lm
        self._lock = threading.Lock()
        self.backend_notes: list[str] = []
        g = manifest.gate
        self.classes: list[str] = list(g["classes"])
        self.safe_classes: list[str] = list(g["safe_classes"])
        self.threshold = float(g["threshold"])
        self.policy: str = g.get("policy", "instruct")
        self.views: str = g.get("views", "any")
        self.anyres: dict | None = manifest.preprocess.get("anyres")
        self.image_newline: np.ndarray | None = None
        if self.anyres is not None:
            name = manifest.graphs["vision_gate"].get("image_newline")
            if not name or name not in manifest.data["files"]:
                raise BundleError(f"{manifest.root}: anyres bundle lacks its hashed image_newline file")
            self.image_newline = np.load(manifest.path(name), allow_pickle=False)      # [D_lm]

    @classmethod
    def load(cls, bundle_dir: str | Path, backend: str = "auto", full_verify: bool = False,
             threads: int | None = None, context: int | None = None) -> "Pipeline":
        """Verify and open a bundle. ``context`` caps the KV cache (default: the model's context length)."""
        from .backends.pick import choose_backend, open_vision

        m = load_manifest(bundle_dir, full_verify=full_verify)
        choice = choose_backend(m, backend)          # choice.notes: why faster backends were passed over
        vision = open_vision(m, choice.name, threads)
        shape = vision.output_shapes.get(GATE_OUTPUT)
        if FEATURES_OUTPUT not in vision.output_names or shape is None:
            raise BundleError(f"{m.root}: vision graph does not emit '{GATE_OUTPUT}': refusing to serve ungated")
        if shape[-1] != len(m.gate["classes"]):
            raise BundleError(f"{m.root}: vision graph's gate width {shape[-1]} differs from the manifest's "
                              f"{len(m.gate['classes'])} classes")
        if context is None:            # the export target's default KV capacity (same for every backend)
            context = m.data.get("build", {}).get("context")
        lm = _load_language_model(m, choice.name, context, threads) if "decoder" in m.graphs else None
        pipe = cls(m, vision, choice.name, lm)
        pipe.backend_notes = list(choice.notes)
        return pipe

    @property
    def has_language_model(self) -> bool:
        return self._lm is not None

    # -- vision + gate ----------------------------------------------------------------------------------
    def pixel_values(self, image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """[V, 3, H, W]: one view, or for anyres models the base view plus tiles."""
        return self._views(image, max_pixels)[0]

    def _views(self, image, max_pixels: int) -> tuple[np.ndarray, tuple[int, int] | None]:
        pil = load_image(image, max_pixels=max_pixels)
        if self.anyres is None:
            return preprocess(pil, self.manifest.preprocess), None
        from .anyres import anyres_views
        return anyres_views(pil, self.manifest.preprocess)                        # [1+T, 3, S, S], (H, W)

    def _vision_pass(self, pv: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, Verdict]:
        t0 = time.perf_counter()
        out = self.vision.run({"pixel_values": pv})                 # pixel_values [V, 3, H, W]
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        probs = out.get(GATE_OUTPUT)
        feats = out[FEATURES_OUTPUT]                                 # [V, N, D_lm]
        if self.anyres is None:
            v = verdict_from_probs(None if probs is None else probs[0], self.classes, self.safe_classes,
                                   self.threshold, latency_ms=ms)
            return feats, v
        from .anyres import features_for_image
        from .views import aggregate_views

        v, view = aggregate_views(probs, self.classes, self.safe_classes, self.threshold, self.views, latency_ms=ms)
        packed = features_for_image(feats, size, self.manifest.preprocess, self.image_newline)   # [1, L, D_lm]
        return packed, replace(v, view=view)

    def encode(self, image, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, Verdict]:
        """(image_features [1, N, D_lm], verdict) for one image (path, bytes or PIL image)."""
        return self._vision_pass(*self._views(image, max_pixels))

    def gate(self, image, max_pixels: int = MAX_PIXELS) -> Verdict:
        return self.encode(image, max_pixels)[1]

    def image_tokens(self, size: tuple[int, int] | None) -> int:
        """Positions one image takes in the prompt (fixed for LLaVA-1.5, by image size for anyres)."""
        if self.anyres is None or size is None:
            return self._lm.image_seq_length
        from .anyres import num_image_tokens
        a = self.anyres
        return num_image_tokens(size, a["grid_pinpoints"], a["tile_size"], a["patch_size"])

    # -- policies ---------------------------------------------------------------------------------------
    def instruction_for(self, category: str, override: str | None = None) -> str:
        text = override or self.manifest.gate.get("instruction") or DEFAULT_INSTRUCTION
        return text.replace("{category}", category.replace("_", " "))

    def refusal_for(self, category: str) -> str:
        refusals = self.manifest.gate.get("refusals") or {}
        return refusals.get(category) or DEFAULT_REFUSAL.replace("{category}", category.replace("_", " "))

    # -- generation -------------------------------------------------------------------------------------
    def stream(self, image, prompt: str, *, policy: str | None = None, instruction: str | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
               max_pixels: int = MAX_PIXELS) -> AnswerStream:
        """Gate ``image`` (None for a text-only prompt) and prepare the answer; iterate for text pieces."""
        return AnswerStream(self, image, prompt, policy=policy, instruction=instruction,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=stop, max_pixels=max_pixels)

    def generate(self, image, prompt: str, **kw) -> Answer:
        """Like :meth:`stream`, run to the end; returns the :class:`Answer`."""
        s = self.stream(image, prompt, **kw)
        for _ in s:
            pass
        return s.result


def _load_language_model(m: Manifest, backend: str, context: int | None, threads: int | None) -> _LanguageModel:
    from tokenizers import Tokenizer

    from .backends.pick import open_decoder

    model, tok, prompt = m.model, m.tokenizer, m.prompt
    for key in ("image_token_id", "image_seq_length", "eos_token_ids", "context_length"):
        if key not in model:
            raise BundleError(f"manifest: 'model' lacks {key}")
    if not prompt.get("chat_template"):
        raise BundleError("manifest: the bundle has no chat template")
    try:
        tokenizer = Tokenizer.from_file(str(m.path(tok["file"])))
    except Exception as e:
        raise BundleError(f"{m.root}: cannot load tokenizer ({one_line(e)})") from None
    emb = m.data.get("embeddings") or {}
    table = np.load(m.path(emb["file"]), mmap_mode="r", allow_pickle=False)     # [V, D]
    so = None
    if threads:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
    decoder = open_decoder(m, backend, context=context, session_options=so)
    # the special tokens transformers hands the template (bundles before 0.1 recorded bos/eos/pad only)
    specials = tok.get("special_tokens") or {k: tok.get(k) for k in ("bos_token", "eos_token", "pad_token")
                                             if tok.get(k)}
    return _LanguageModel(decoder, table, tokenizer, prompt["chat_template"], specials,
                          int(model["image_token_id"]), int(model["image_seq_length"]),
                          [int(i) for i in model["eos_token_ids"]])
