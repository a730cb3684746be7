"""Prompt rendering and tokenization for LLaVA-family chat templates, without transformers.

Supported: any Hugging Face chat template (Jinja) that reads ``messages`` with content parts
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` and ``add_generation_prompt`` — the llava-hf
LLaVA-1.5 template among them. One user turn, at most one image.

* :func:`render` builds the single user turn and renders it in a sandbox configured like transformers'
  ``apply_chat_template`` (``ImmutableSandboxedEnvironment``, ``trim_blocks``/``lstrip_blocks``,
  ``loopcontrols``, the ``raise_exception``/``strftime_now`` globals and the non-escaping ``tojson``
  filter), so a bundle's template renders byte-identically on the device. Templates are untrusted data
  (they come from the checkpoint), hence the sandbox.
* SafeCLIP's safety instruction for a flagged image is its own text part, placed right after the image and
  before the user's text; a clean image gets none (no extra tokens on neutral inputs).
* :func:`tokenize` encodes with the bundle's ``tokenizers.Tokenizer`` and expands every image placeholder
  id into ``image_seq_length`` positions, as ``LlavaProcessor`` does by repeating the ``<image>`` string
  before tokenizing. Nothing here hard-codes a token id: ids come from the manifest.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import numpy as np

__all__ = ["PromptError", "render", "tokenize", "build_messages"]


class PromptError(ValueError):
    """A chat template that cannot render, or a prompt that cannot be tokenized as asked."""


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson, which would HTML-escape; keep the same output.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"chat template does not compile: {e}") from None


def build_messages(user_text: str, has_image: bool, instruction: str | None = None) -> list[dict[str, Any]]:
    """One user turn: [image]? [instruction]? user_text (the instruction only makes sense with an image)."""
    content: list[dict[str, Any]] = []
    if has_image:
        content.append({"type": "image"})
    if instruction:
        content.append({"type": "text", "text": instruction})
    content.append({"type": "text", "text": user_text})
    return [{"role": "user", "content": content}]


def render(chat_template: str, user_text: str, has_image: bool, instruction: str | None = None, *,
           bos_token: str | None = None, eos_token: str | None = None, add_generation_prompt: bool = True,
           **special_tokens: str) -> str:
    """Render one user turn with the checkpoint's chat template; returns the prompt text.

    ``bos_token``/``eos_token`` and any further ``special_tokens`` (``unk_token``, ``pad_token``, ...) are
    passed to the template as transformers does (its ``special_tokens_map``); templates that print them need
    them, the LLaVA-1.5 one does not.
    """
    import jinja2

    if not isinstance(user_text, str):
        raise PromptError(f"user text must be a string, got {type(user_text).__name__}")
    tokens = {k: v for k, v in {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}.items()
              if v is not None}
    template = _compile(chat_template)
    try:
        return template.render(messages=build_messages(user_text, has_image, instruction), tools=None,
                               documents=None, add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"chat template failed: {e}") from None


def tokenize(tokenizer, text: str, image_token_id: int, image_seq_length: int, *,
             add_special_tokens: bool | None = None, bos_token: str | None = None,
             num_images: int | None = None) -> np.ndarray:
    """Token ids [S] int64 of ``text`` with each image placeholder expanded to ``image_seq_length`` ids.

    ``add_special_tokens=None`` follows ``LlavaProcessor``: the tokenizer's own specials (BOS) are added
    unless the rendered text already starts with ``bos_token``. With ``num_images``, the number of
    placeholders must match it (a user who types the placeholder string into their text is caught here).
    """
    if image_seq_length < 1:
        raise PromptError(f"image_seq_length must be positive, got {image_seq_length}")
    if add_special_tokens is None:
        add_special_tokens = not (bos_token and text.startswith(bos_token))
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int64)
    # ids: [S0] -> [S0 + n_images * (image_seq_length - 1)]
    is_image = ids == image_token_id
    n = int(is_image.sum())
    if num_images is not None and n != num_images:
        raise PromptError(f"prompt holds {n} image placeholders, expected {num_images}")
    if n == 0:
        return ids
    repeats = np.where(is_image, image_seq_length, 1)
    return np.repeat(ids, repeats)
