"""``Pipeline``: a verified bundle, its vision+gate graph and (when present) its language model.

    pipe = Pipeline.load("engines/demo")
    verdict = pipe.gate("photo.jpg")                              # Verdict(flagged, category, score, ...)
    answer = pipe.generate("photo.jpg", "What is in the picture?")  # Answer(text, verdict, policy, timings)
    for piece in (s := pipe.stream("photo.jpg", "Describe it")):  # text as it is generated
        print(piece, end="")
    s.result                                                      # the Answer, once the stream is done

Loading verifies the manifest and every file (see ``manifest.py``; with trusted keys, its signature), then
checks that the vision graph really emits the gate output with one probability per manifest class and runs
the gate's known-answer self-test on the session that will serve (``selftest.py``); anything else refuses to
serve.

Policies for a flagged image (default from the manifest; a call's ``policy=`` overrides it; the server fixes one):
``instruct`` inserts the safety instruction right after the image, before the user's text (a clean image
gets no extra tokens); ``refuse`` answers with the category's templated refusal and never runs the
language model; ``annotate`` generates as usual and reports the verdict. Text-only prompts are not gated.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .answer import Answer, AnswerStream, GenerationUnavailable, _ms  # noqa: F401  (re-exported)
from .backends.base import ContextError
from .gate import DEFAULT_INSTRUCTION, DEFAULT_REFUSAL, POLICIES, Verdict, verdict_from_probs
from .image import MAX_PIXELS, load_image, preprocess
from .manifest import BundleError, Manifest, load_manifest
from .error_text import one_line


class _DecoderLease:
    """One request's use of the pipeline's single decoder, one locked step at a time (the ``Decoder`` shape).

    Each call takes the lock, runs, copies the logits out, and releases it. The decoder remembers whose
    sequence its cache holds; when another request ran in between, the cache is rebuilt by one prefill of
    this request's prompt plus every token it has fed (same positions, same result up to rounding), so
    interleaved or abandoned streams stay correct and never block each other.
    """

    def __init__(self, pipe: "Pipeline"):
        self.pipe, self.dec = pipe, pipe._lm.decoder
        self.capacity, self.hidden_size, self.dtype = self.dec.capacity, self.dec.hidden_size, self.dec.dtype
        self._prompt: np.ndarray | None = None
        self._fed: list[np.ndarray] = []
        self._token = object()                      # what the pipeline remembers (not the lease: no cycle, no leak)

    @property
    def length(self) -> int:
        return 0 if self._prompt is None else len(self._prompt) + len(self._fed)

    def reset(self, length: int = 0) -> None:
        self._prompt, self._fed = None, []

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs_embeds)
        self._prompt, self._fed = x.reshape(-1, x.shape[-1]), []                   # [S, D]
        with self.pipe._lock:
            self.pipe._cache_owner = self._token
            return np.array(self.dec.prefill(self._prompt))

    def decode_one_token(self, token_embeds: np.ndarray) -> np.ndarray:
        e = np.asarray(token_embeds, dtype=self.dtype).reshape(-1)
        self._fed.append(e)
        with self.pipe._lock:
            if self.pipe._cache_owner is self._token:
                return np.array(self.dec.decode_one_token(e))
            self.pipe._cache_owner = self._token                                 # another request ran: rebuild
            x = np.concatenate([np.asarray(self._prompt, self.dtype), np.stack(self._fed)])   # [S + n, D]
            return np.array(self.dec.prefill(x))


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
        self._lock = threading.Lock()                # one decoder: one step at a time (_DecoderLease)
        self._cache_owner: object | None = None      # the token of the _DecoderLease whose sequence is cached
        self.backend_notes: list[str] = []
        self.image_cache_bytes = 256 << 20            # conversations' image features + verdicts (chat.ImageCache)
        self._image_cache = None
        self.scheduler = None                         # scheduler.Scheduler once enable_batching ran
        g, self.names = manifest.gate_config, manifest.vision.names      # validated when the bundle loaded
        self.classes: list[str] = list(g.classes)
        self.safe_classes: list[str] = list(g.safe_classes)
        self.threshold = g.threshold
        self.policy: str = g.policy
        self.views: str = g.views
        self.anyres: dict | None = manifest.preprocess.get("anyres")
        self.image_newline: np.ndarray | None = None
        if self.anyres is not None:
            name = manifest.vision.image_newline
            if not name or name not in manifest.files:
                raise BundleError(f"{manifest.root}: anyres bundle lacks its hashed image_newline file")
            self.image_newline = np.load(manifest.path(name), allow_pickle=False)      # [D_lm]

    @classmethod
    def load(cls, bundle_dir: str | Path, backend: str = "auto", full_verify: bool = False,
             threads: int | None = None, context: int | None = None, language_model: bool = True,
             trusted_keys=None) -> "Pipeline":
        """Verify and open a bundle. ``context`` caps the KV cache (default: the export target's, at most the
        model's context length; an explicit one above the model's is refused with ``ContextError``).
        ``language_model=False`` opens the vision+gate graph only (``safeclip-scan``): the decoder, tokenizer
        and embedding table are never loaded, and ``stream``/``generate`` raise ``GenerationUnavailable``.
        ``trusted_keys`` (PEM paths, or a ``signing.TrustedKeys``) adds to ``$SAFECLIP_TRUSTED_KEYS``: with any
        trusted key the bundle must be signed by one (``manifest.load_manifest``). The gate's known-answer
        self-test (``selftest.py``) runs on the opened vision session before anything is served."""
        try:
            return cls._load(bundle_dir, backend, full_verify, threads, context, language_model, trusted_keys)
        except (RecursionError, PermissionError) as e:   # a hostile manifest or folder: still one line
            raise BundleError(f"{bundle_dir}: cannot load bundle ({type(e).__name__}: {one_line(e)})") from None

    @classmethod
    def _load(cls, bundle_dir, backend, full_verify, threads, context, language_model, trusted_keys) -> "Pipeline":
        from .backends.pick import choose_backend, open_vision

        m = load_manifest(bundle_dir, full_verify=full_verify, trusted_keys=trusted_keys)
        if context is not None and m.decoder is not None and language_model \
                and int(context) > m.model_facts.context_length:
            # asked for explicitly: refused rather than silently cut to what the model's positions cover
            raise ContextError(f"context {context} is more than the model's context length "
                               f"{m.model_facts.context_length}: ask for at most that")
        choice = choose_backend(m, backend)          # choice.notes: why faster backends were passed over
        vision = open_vision(m, choice.name, threads)
        names, n_classes = m.vision.names, len(m.gate_config.classes)
        shape = vision.output_shapes.get(names.class_probs)
        if names.image_features not in vision.output_names or shape is None:
            raise BundleError(f"{m.root}: vision graph does not emit '{names.class_probs}': refusing to serve ungated")
        if shape[-1] != n_classes:
            raise BundleError(f"{m.root}: vision graph's gate width {shape[-1]} differs from the manifest's "
                              f"{n_classes} classes")
        _self_test(m, vision)
        if context is None:            # the export target's default KV capacity (same for every backend)
            context = m.default_context
        lm = (_load_language_model(m, choice.name, context, threads)
              if m.decoder is not None and language_model else None)
        pipe = cls(m, vision, choice.name, lm)
        pipe.backend_notes = list(choice.notes)
        return pipe

    @property
    def has_language_model(self) -> bool:
        return self._lm is not None

    def enable_batching(self, max_batch: int, *, max_waiting: int | None = None,
                        prefill_chunk: int | None = None):
        """Generate through a ``scheduler.Scheduler``: up to ``max_batch`` requests decode together (a
        slot decoder sharing the decoder's weights: ``backends.slots.SlotDecoder`` on ONNX Runtime's session, CPU
        or CUDA; ``backends.trt.TrtSlotDecoder`` on the TensorRT plan and context, whose decode profile
        must cover ``max_batch``; one KV slot per sequence, each the decoder's capacity). :meth:`stream` then
        queues each request (``scheduler.QueueFull`` past ``max_waiting``). Returns the scheduler."""
        from .backends.pick import slot_decoder
        from .scheduler import Scheduler

        if self._lm is None:
            raise GenerationUnavailable(f"{self.manifest.root}: bundle has no language model to batch")
        if self.scheduler is not None:
            self.scheduler.close()
        dec = slot_decoder(self._lm.decoder, max_batch)
        self.scheduler = Scheduler(dec, self._lm.table, max_waiting=max_waiting, prefill_chunk=prefill_chunk)
        return self.scheduler

    # -- conversations (chat.py) ------------------------------------------------------------------------
    def chat(self, system: str | None = None, prefix_cache=None):
        """A new conversation (``chat.Chat``): ``ask(text, image=None, ...)`` per turn, ``history``, ``reset()``;
        ``prefix_cache`` (a ``prefix_cache.PrefixCache``) shares KV snapshots between conversations."""
        from .chat import Chat
        return Chat(self, system, prefix_cache)

    @property
    def image_cache(self):
        """Image features and verdicts by content hash, shared by this pipeline's conversations (LRU, bounded)."""
        if self._image_cache is None:
            from .chat import ImageCache
            self._image_cache = ImageCache(self.image_cache_bytes)
        return self._image_cache

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
        out = self.vision.run({self.names.pixel_values: pv})        # pixel_values [V, 3, H, W]
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        probs = out.get(self.names.class_probs)                      # [V, C]
        feats = out[self.names.image_features]                       # [V, N, D_lm]
        if self.anyres is None:
            v = verdict_from_probs(None if probs is None else probs[0], self.classes, self.safe_classes,
                                   self.threshold, latency_ms=ms)
            return feats, v
        from .anyres import features_for_image
        from .gate import aggregate_views

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
        text = override or self.manifest.gate_config.instruction or DEFAULT_INSTRUCTION
        return text.replace("{category}", category.replace("_", " "))

    def refusal_for(self, category: str) -> str:
        return self.manifest.gate_config.refusals.get(category) or DEFAULT_REFUSAL.replace("{category}", category.replace("_", " "))

    # -- generation -------------------------------------------------------------------------------------
    def stream(self, image, prompt: str, *, policy: str | None = None, instruction: str | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
               max_pixels: int = MAX_PIXELS) -> AnswerStream:
        """Gate ``image`` (None for a text-only prompt) and prepare the answer; iterate for text pieces.

        Raises here, before any language-model work: an unknown policy, an empty prompt, an unreadable
        image, a prompt longer than the context (``ContextError``), a bundle without a language model.
        """
        from .generate import TextStream, embed_prompt
        from .prompt import render, tokenize

        t0 = time.perf_counter()
        policy = policy or self.policy
        if policy not in POLICIES:
            raise ValueError(f"unknown policy '{policy}' (supported: {', '.join(POLICIES)})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        lm, has_image, timings = self._lm, image is not None, {}
        pv = size = verdict = feats = None
        if has_image:
            t1 = time.perf_counter()
            pv, size = self._views(image, max_pixels)
            timings["preprocess_ms"] = _ms(time.perf_counter() - t1)

        def ids_for(instr: str | None) -> np.ndarray:
            text = render(lm.template, prompt, has_image, instr, **lm.special_tokens)
            return tokenize(lm.tokenizer, text, lm.image_token_id, self.image_tokens(size),
                            bos_token=lm.special_tokens.get("bos_token"), num_images=int(has_image))

        if lm is not None:
            ids = ids_for(None)
            if ids.size > lm.decoder.capacity:          # before the vision pass and the language model
                raise ContextError(f"prompt of {ids.size} tokens exceeds the context capacity of "
                                   f"{lm.decoder.capacity} tokens")
        if has_image:
            feats, verdict = self._vision_pass(pv, size)
            timings["vision_gate_ms"] = verdict.latency_ms
        flagged = verdict is not None and verdict.flagged
        if flagged and policy == "refuse":
            timings["total_ms"] = _ms(time.perf_counter() - t0)
            return AnswerStream(self, verdict=verdict, policy=policy, action="refused", timings=timings, t0=t0,
                                refusal=self.refusal_for(verdict.category))
        if lm is None:
            raise GenerationUnavailable(f"{self.manifest.root}: bundle has no language model "
                                        "(exported with --no-decoder); only gating is available")
        instr = None
        if flagged and policy == "instruct":
            instr = self.instruction_for(verdict.category, instruction)
            ids = ids_for(instr)
        embeds = embed_prompt(lm.table, ids, lm.image_token_id, None if feats is None else feats[0],
                              dtype=lm.decoder.dtype)                          # [S, D]
        kw = dict(tokenizer=lm.tokenizer, max_new_tokens=max_new_tokens, eos_token_ids=lm.eos_ids,
                  stop_strings=list(stop), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        text = (self.scheduler.submit(embeds, **kw) if self.scheduler is not None   # scheduler.py: joins the batch
                else TextStream(_DecoderLease(self), lm.table, embeds, **kw))
        action = "instructed" if instr else "annotated" if flagged else "generated"
        return AnswerStream(self, verdict=verdict, policy=policy, action=action, timings=timings, t0=t0,
                            text_stream=text)

    def generate(self, image, prompt: str, **kw) -> Answer:
        """Like :meth:`stream`, run to the end; returns the :class:`Answer`."""
        s = self.stream(image, prompt, **kw)
        for _ in s:
            pass
        return s.result


def _self_test(m: Manifest, vision) -> None:
    """The gate's known-answer test on the session that will serve (``selftest.py``); refuses on a mismatch."""
    from .selftest import SelfTestError, check

    names = m.vision.names
    size = m.vision.inputs[names.pixel_values].shape[-1]

    def run(pv: np.ndarray):                                      # pixel_values [1, 3, S, S]
        out = vision.run({names.pixel_values: pv})
        return out[names.image_features], out[names.class_probs]

    try:
        if not isinstance(size, int):
            raise SelfTestError(f"the vision graph's input size {size!r} is not fixed")
        check(m.gate.get("self_test"), run, size)
    except SelfTestError as e:
        raise BundleError(f"{m.root}: {e}") from None


def _load_language_model(m: Manifest, backend: str, context: int | None, threads: int | None) -> _LanguageModel:
    from tokenizers import Tokenizer

    from .backends.pick import open_decoder

    model, tok, prompt = m.model_facts, m.tokenizer, m.prompt
    if not prompt.get("chat_template"):
        raise BundleError("manifest: the bundle has no chat template")
    try:
        tokenizer = Tokenizer.from_file(str(m.path(tok["file"])))
    except Exception as e:
        raise BundleError(f"{m.root}: cannot load tokenizer ({one_line(e)})") from None
    table = np.load(m.path(m.embeddings_file), mmap_mode="r", allow_pickle=False)     # [V, D]
    decoder = open_decoder(m, backend, context=context, threads=threads)     # threads: else SAFECLIP_THREADS
    # the special tokens transformers hands the template (bundles before 0.1 recorded bos/eos/pad only)
    specials = tok.get("special_tokens") or {k: tok.get(k) for k in ("bos_token", "eos_token", "pad_token")
                                             if tok.get(k)}
    return _LanguageModel(decoder, table, tokenizer, prompt["chat_template"], specials, model.image_token_id,
                          model.image_seq_length, list(model.eos_token_ids))
