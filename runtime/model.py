"""The model behind a bundle, as every app uses it: :class:`VisionGate` (the vision+gate graph) and
:class:`LanguageModel` (decoder, embedding table, tokenizer, chat template).

    pipe = Pipeline.load("engines/demo")
    feats, verdict = pipe.vision.encode("photo.jpg")     # image_features [1, N, D_lm], the gate's Verdict
    pipe.vision.gate_batch([pv1, pv2])                    # one graph run, one verdict per single-view image
    lm = pipe.language_model                              # None for a bundle exported with --no-decoder
    ids = lm.tokenize(lm.render(messages), num_images=1)  # [S] with one position per image

These are the core's public face: ``chat.py``, ``scheduler.py``, ``serve/``, ``scan/``, the scripts and the
tests use these objects and their public members, never a pipeline's private ones. ``LanguageModel.lock``
serialises decoder steps and ``LanguageModel.owner`` names the lease whose sequence the decoder's one-sequence
cache holds (``lease.py``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .gate import Verdict, verdict_from_probs
from .image import MAX_PIXELS, load_image, preprocess
from .manifest import BundleError

__all__ = ["VisionGate", "LanguageModel"]


class VisionGate:
    """The vision+gate graph of a verified bundle: image -> views -> (image features, verdict).

    ``session`` is the backend's session (``backends.pick.open_vision``); ``names`` its tensor names. For
    anyres (LLaVA-NeXT) bundles an image is a base view plus tiles whose verdicts aggregate per the manifest's
    ``views`` rule (``gate.aggregate_views``) and whose features are packed with the image-newline rows
    (``anyres.py``).
    """

    def __init__(self, manifest, session):
        g = manifest.gate_config                                # validated when the bundle loaded
        self.manifest, self.session, self.names = manifest, session, manifest.vision.names
        self.classes: list[str] = list(g.classes)
        self.safe_classes: list[str] = list(g.safe_classes)
        self.threshold: float = g.threshold
        self.view_rule: str = g.view_rule
        self.anyres: dict | None = manifest.preprocess.get("anyres")
        self.image_newline: np.ndarray | None = None
        if self.anyres is not None:
            name = manifest.vision.image_newline
            if not name or name not in manifest.files:
                raise BundleError(f"{manifest.root}: anyres bundle lacks its hashed image_newline file")
            self.image_newline = np.load(manifest.path(name), allow_pickle=False)      # [D_lm]

    def views(self, image, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int] | None]:
        """(pixel_values [V, 3, H, W], the image's (H, W) for anyres else None): one view, or base view + tiles."""
        pil = load_image(image, max_pixels=max_pixels)
        if self.anyres is None:
            return preprocess(pil, self.manifest.preprocess), None
        from .anyres import anyres_views
        return anyres_views(pil, self.manifest.preprocess)                        # [1+T, 3, S, S], (H, W)

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for pixel_values [B, 3, H, W]: image_features [B, N, D_lm], class_probs [B, C]."""
        return self.session.run({self.names.pixel_values: pixel_values})

    def encode_views(self, pv: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, Verdict]:
        """(image_features [1, L, D_lm], verdict) for one image's views from :meth:`views`."""
        t0 = time.perf_counter()
        out = self.run(pv)                                            # pixel_values [V, 3, H, W]
        ms = round((time.perf_counter() - t0) * 1e3, 3)
        probs = out.get(self.names.class_probs)                       # [V, C]
        feats = out[self.names.image_features]                        # [V, N, D_lm]
        if self.anyres is None:
            v = verdict_from_probs(None if probs is None else probs[0], self.classes, self.safe_classes,
                                   self.threshold, latency_ms=ms)
            return feats, v
        from .anyres import features_for_image
        from .gate import aggregate_views

        v, view = aggregate_views(probs, self.classes, self.safe_classes, self.threshold, self.view_rule,
                                  latency_ms=ms)
        packed = features_for_image(feats, size, self.manifest.preprocess, self.image_newline)   # [1, L, D_lm]
        return packed, replace(v, view=view)

    def encode(self, image, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, Verdict]:
        """(image_features [1, N, D_lm], verdict) for one image (path, bytes or PIL image)."""
        return self.encode_views(*self.views(image, max_pixels))

    def gate(self, image, max_pixels: int = MAX_PIXELS) -> Verdict:
        return self.encode(image, max_pixels)[1]

    def gate_batch(self, pixel_values: list[np.ndarray]) -> list[Verdict]:
        """One verdict per single-view image ([1, 3, H, W] each), from one run of the graph over the batch.
        Anyres bundles gate an image's views together: use :meth:`gate` per image. Raises what the backend
        raises (e.g. a TensorRT profile smaller than the batch)."""
        if self.anyres is not None:
            raise ValueError("gate_batch takes single-view images; an anyres bundle gates each image's views "
                             "together (VisionGate.gate)")
        probs = self.run(np.concatenate(pixel_values)).get(self.names.class_probs)        # [B, C]
        return [verdict_from_probs(None if probs is None else probs[j], self.classes, self.safe_classes,
                                   self.threshold) for j in range(len(pixel_values))]

    def image_tokens(self, size: tuple[int, int] | None) -> int:
        """Positions one image takes in the prompt (fixed for LLaVA-1.5, by image size for anyres)."""
        if self.anyres is None or size is None:
            return self.manifest.model_facts.image_seq_length
        from .anyres import num_image_tokens
        a = self.anyres
        return num_image_tokens(size, a["grid_pinpoints"], a["tile_size"], a["patch_size"])


@dataclass(eq=False)
class LanguageModel:
    """The language model of a bundle (``Pipeline.language_model``): what a request needs to become tokens,
    embeddings and text. ``decoder`` has the ``backends.base.Decoder`` shape (one sequence; its KV cache)."""
    decoder: Any
    table: np.ndarray                       # [V, D] the embedding table (memory-mapped)
    tokenizer: Any                          # tokenizers.Tokenizer of the bundle's tokenizer.json
    template: str                           # the checkpoint's chat template
    special_tokens: dict                    # what transformers hands the template (bos_token, eos_token, ...)
    image_token_id: int
    image_seq_length: int
    eos_ids: list[int]
    lock: threading.Lock = field(default_factory=threading.Lock)    # one decoder: one step at a time
    owner: object | None = None             # the lease whose sequence the decoder's cache holds (lease.py)

    @property
    def capacity(self) -> int:
        return self.decoder.capacity

    def render(self, messages: list[dict]) -> str:
        """The conversation through the bundle's chat template, with the generation prompt (as transformers'
        ``apply_chat_template`` renders it: ``prompt.render_messages``)."""
        from .prompt import render_messages
        return render_messages(self.template, messages, add_generation_prompt=True, **self.special_tokens)

    def tokenize(self, text: str, num_images: int) -> np.ndarray:
        """Token ids [S] of rendered ``text``, one position per image placeholder (expanded by the caller)."""
        from .prompt import tokenize
        return tokenize(self.tokenizer, text, self.image_token_id, 1,
                        bos_token=self.special_tokens.get("bos_token"), num_images=num_images)

    def embed(self, ids: np.ndarray, image_features: np.ndarray | None) -> np.ndarray:
        """Prompt embeddings [S, D] in the decoder's dtype, image positions filled with ``image_features``."""
        from .generate import embed_prompt
        return embed_prompt(self.table, ids, self.image_token_id, image_features, dtype=self.decoder.dtype)
