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
serve. ``pipe.vision`` and ``pipe.language_model`` are the model handle (``model.py``); every request, a one-shot
``stream``/``generate`` included, takes one route: ``Chat.ask`` (``chat.py``).

Policies for a flagged image (default from the manifest; a call's ``policy=`` overrides it; the server fixes one):
``instruct`` inserts the safety instruction right after the image, before the user's text (a clean image
gets no extra tokens); ``refuse`` answers with the category's templated refusal and never runs the
language model; ``annotate`` generates as usual and reports the verdict. Text-only prompts are not gated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .answer import Answer, AnswerStream, GenerationUnavailable  # noqa: F401  (re-exported)
from .backends.base import ContextError
from .error_text import one_line
from .gate import DEFAULT_INSTRUCTION, DEFAULT_REFUSAL, Verdict
from .image import MAX_PIXELS
from .manifest import BundleError, Manifest, load_manifest
from .model import LanguageModel, VisionGate


class Pipeline:
    """A loaded bundle: ``vision`` (:class:`~.model.VisionGate`), ``language_model`` (:class:`~.model.LanguageModel`,
    None with ``language_model=False`` or a --no-decoder bundle), the gate's settings, and the request route
    (``chat``/``stream``/``generate``; ``scheduler`` once :meth:`enable_batching` ran)."""

    def __init__(self, manifest: Manifest, vision: VisionGate, backend: str, lm: LanguageModel | None = None):
        self.manifest, self.vision, self.backend, self.language_model = manifest, vision, backend, lm
        self.backend_notes: list[str] = []
        self.image_cache_bytes = 256 << 20            # conversations' image features + verdicts (chat.ImageCache)
        self._image_cache = None
        self.scheduler = None                         # scheduler.Scheduler once enable_batching ran
        self.names = manifest.vision.names
        self.policy: str = manifest.gate_config.policy    # validated when the bundle loaded

    # the gate's settings are the VisionGate's (one copy: an override such as safeclip-scan's --threshold
    # reaches every verdict)
    @property
    def classes(self) -> list[str]:
        return self.vision.classes

    @property
    def safe_classes(self) -> list[str]:
        return self.vision.safe_classes

    @property
    def threshold(self) -> float:
        return self.vision.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.vision.threshold = float(value)

    @property
    def views(self) -> str:
        return self.vision.view_rule

    @property
    def anyres(self) -> dict | None:
        return self.vision.anyres

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
        from .selftest import check_session

        m = load_manifest(bundle_dir, full_verify=full_verify, trusted_keys=trusted_keys)
        if context is not None and m.decoder is not None and language_model \
                and int(context) > m.model_facts.context_length:
            # asked for explicitly: refused rather than silently cut to what the model's positions cover
            raise ContextError(f"context {context} is more than the model's context length "
                               f"{m.model_facts.context_length}: ask for at most that")
        choice = choose_backend(m, backend)          # choice.notes: why faster backends were passed over
        session = open_vision(m, choice.name, threads)
        names, n_classes = m.vision.names, len(m.gate_config.classes)
        shape = session.output_shapes.get(names.class_probs)
        if names.image_features not in session.output_names or shape is None:
            raise BundleError(f"{m.root}: vision graph does not emit '{names.class_probs}': refusing to serve ungated")
        if shape[-1] != n_classes:
            raise BundleError(f"{m.root}: vision graph's gate width {shape[-1]} differs from the manifest's "
                              f"{n_classes} classes")
        check_session(m, session)                    # the gate's known-answer test (selftest.py)
        vision = VisionGate(m, session)
        if context is None:            # the export target's default KV capacity (same for every backend)
            context = m.default_context
        lm = (_load_language_model(m, choice.name, context, threads)
              if m.decoder is not None and language_model else None)
        pipe = cls(m, vision, choice.name, lm)
        pipe.backend_notes = list(choice.notes)
        return pipe

    @property
    def has_language_model(self) -> bool:
        return self.language_model is not None

    def enable_batching(self, max_batch: int, *, max_waiting: int | None = None,
                        prefill_chunk: int | None = None):
        """Generate through a ``scheduler.Scheduler``: up to ``max_batch`` requests decode together (a
        slot decoder sharing the decoder's weights: ``backends.slots.SlotDecoder`` on ONNX Runtime's session, CPU
        or CUDA; ``backends.trt.TrtSlotDecoder`` on the TensorRT plan and context, whose decode profile
        must cover ``max_batch``; one KV slot per sequence, each the decoder's capacity). :meth:`stream` then
        queues each request (``scheduler.QueueFull`` past ``max_waiting``). Returns the scheduler."""
        from .backends.pick import slot_decoder
        from .scheduler import Scheduler

        lm = self.language_model
        if lm is None:
            raise GenerationUnavailable(f"{self.manifest.root}: bundle has no language model to batch")
        if self.scheduler is not None:
            self.scheduler.close()
        dec = slot_decoder(lm.decoder, max_batch)
        self.scheduler = Scheduler(dec, lm.table, max_waiting=max_waiting, prefill_chunk=prefill_chunk)
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

    # -- vision + gate (the VisionGate's, for convenience) ------------------------------------------------
    def pixel_values(self, image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """[V, 3, H, W]: one view, or for anyres models the base view plus tiles."""
        return self.vision.views(image, max_pixels)[0]

    def encode(self, image, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, Verdict]:
        """(image_features [1, N, D_lm], verdict) for one image (path, bytes or PIL image)."""
        return self.vision.encode(image, max_pixels)

    def gate(self, image, max_pixels: int = MAX_PIXELS) -> Verdict:
        return self.vision.gate(image, max_pixels)

    def image_tokens(self, size: tuple[int, int] | None) -> int:
        """Positions one image takes in the prompt (fixed for LLaVA-1.5, by image size for anyres)."""
        return self.vision.image_tokens(size)

    # -- policies ---------------------------------------------------------------------------------------
    def instruction_for(self, category: str, override: str | None = None) -> str:
        text = override or self.manifest.gate_config.instruction or DEFAULT_INSTRUCTION
        return text.replace("{category}", category.replace("_", " "))

    def refusal_for(self, category: str) -> str:
        return self.manifest.gate_config.refusals.get(category) or DEFAULT_REFUSAL.replace("{category}", category.replace("_", " "))

    # -- generation ---------------------------------------------------------------------------------------
    def stream(self, image, prompt: str, *, policy: str | None = None, instruction: str | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
               max_pixels: int = MAX_PIXELS):
        """Gate ``image`` (None for a text-only prompt) and prepare the answer; iterate for text pieces.

        A one-turn conversation: the same route as every :meth:`chat` turn (``Chat.ask``), so the result is a
        ``chat.ChatAnswer`` (an :class:`Answer` with the conversation's verdicts and cached tokens).
        Raises here, before any language-model work: an unknown policy, an empty prompt, an unreadable
        image, a prompt longer than the context (``ContextError``), a bundle without a language model.
        """
        return self.chat().ask(prompt, image, policy=policy, instruction=instruction, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                               max_pixels=max_pixels)

    def generate(self, image, prompt: str, **kw) -> Answer:
        """Like :meth:`stream`, run to the end; returns the :class:`Answer`."""
        s = self.stream(image, prompt, **kw)
        for _ in s:
            pass
        return s.result


def _load_language_model(m: Manifest, backend: str, context: int | None, threads: int | None) -> LanguageModel:
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
    return LanguageModel(decoder, table, tokenizer, prompt["chat_template"], specials, model.image_token_id,
                          model.image_seq_length, list(model.eos_token_ids))
