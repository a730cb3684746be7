"""Prompt rendering and tokenization for LLaVA-family chat templates, without transformers.

Supported: every chat template (Jinja) that transformers 5.24's ``tokenizer.apply_chat_template`` renders,
rendered byte-identically, whole conversations included (system / user / assistant turns; content a string or
a list of parts ``{"type": "image"}`` / ``{"type": "text", "text": ...}``). The published llava-hf templates
(LLaVA-1.5, LLaVA-NeXT) are among them; ``tests/data/chat_templates/`` holds them and the tests compare every
one with transformers.

How (mirrors ``transformers/utils/chat_template_utils.py``: ``_cached_compile_jinja_template`` and
``render_jinja_template``, read at 5.24.0):

* The environment: ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
  ``loopcontrols`` extension and transformers' ``{% generation %}...{% endgeneration %}`` tag (its
  ``AssistantTracker``: the body renders unchanged; the token-mask bookkeeping is training-only and not kept);
  the globals ``raise_exception`` (-> :class:`PromptError`), ``strftime_now``, a ``dict`` that is a plain
  callable (no class to climb), a ``namespace`` that refuses underscore-prefixed names; the ``tojson`` filter
  that does not HTML-escape (``json.dumps``, ``ensure_ascii=False``). jinja2 >= 3.1.6 is required, as
  transformers requires it (older versions have known sandbox escapes).
* The variables: ``messages``, ``tools=None``, ``documents=None``, ``add_generation_prompt`` and the special
  tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ...: transformers passes the tokenizer's
  ``special_tokens_map``; a token given as None is left out, as that map leaves it out).
* The messages are prepared as transformers prepares them: keys whose value is None are dropped, every value
  is rebuilt from plain JSON types (anything else, e.g. a decoded image, becomes the inert ``"<TypeName>"``
  placeholder), and a turn's reasoning is aliased under ``thinking`` / ``reasoning_content``. OpenAI-style
  ``image_url`` parts are *not* converted (transformers' tokenizer does not either; a caller maps them to
  ``{"type": "image"}`` first).

Templates are untrusted data (they come from the checkpoint), hence the sandbox: attribute escapes
(``__class__``, ``__mro__``, ``__subclasses__``, ...) are refused with :class:`PromptError`, as is every other
failure of a template, compile-time or render-time, in one line.

* :func:`render_messages` renders a conversation; :func:`render` builds and renders the single user turn the
  pipeline sends today. SafeCLIP's safety instruction for a flagged image is its own text part, placed right
  after the image and before the user's text; a clean image gets none (no extra tokens on neutral inputs).
* :func:`tokenize` encodes with the bundle's ``tokenizers.Tokenizer`` and expands every image placeholder
  id into ``image_seq_length`` positions, as ``LlavaProcessor`` does by repeating the ``<image>`` string
  before tokenizing. Nothing here hard-codes a token id: ids come from the manifest.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np

from .error_text import one_line

__all__ = ["PromptError", "render", "render_messages", "tokenize", "build_messages"]

MIN_JINJA = (3, 1, 6)                           # transformers refuses older jinja2: known sandbox escapes
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class PromptError(ValueError):
    """A chat template that cannot render, or a prompt that cannot be tokenized as asked."""


def _jinja_version_ok(version: str) -> bool:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_JINJA


def _extensions() -> list:
    """Jinja extensions of transformers' chat-template environment: ``{% generation %}`` and loopcontrols."""
    import jinja2
    import jinja2.nodes
    from jinja2.ext import Extension, loopcontrols

    class GenerationTag(Extension):
        # transformers' AssistantTracker, rendering only: ``{% generation %}body{% endgeneration %}`` -> body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller):
            return caller()

    return [GenerationTag, loopcontrols]


def _environment():
    """A fresh sandbox configured exactly like transformers' ``_cached_compile_jinja_template``."""
    import jinja2
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not _jinja_version_ok(jinja2.__version__):
        raise PromptError(f"chat templates need jinja2 >= 3.1.6 (older versions have known sandbox escapes), "
                          f"found {jinja2.__version__}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson, which would HTML-escape; keep the same output.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # a plain callable: templates cannot reach dict's class through it
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore-prefixed (dunder) attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                    "Please rename the attribute.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=_extensions())
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str):
    import jinja2

    try:
        return _environment().from_string(chat_template)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"chat template does not compile: {one_line(e)}") from None


def _plain(value: Any) -> Any:
    """transformers' ``_plain_template_data``: plain JSON types only; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare(messages) -> list[dict[str, Any]]:
    """Messages as transformers hands them to the template (normalised, plain, reasoning aliased)."""
    if not isinstance(messages, (list, tuple)):
        raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise PromptError("cannot render an empty conversation: give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_messages(chat_template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **special_tokens: Any) -> str:
    """Render a whole conversation with the checkpoint's chat template; returns the prompt text.

    ``messages``: dicts with ``role`` and ``content`` (a string, or a list of ``{"type": "image"}`` /
    ``{"type": "text", "text": ...}`` parts). ``special_tokens``: the tokenizer's ``special_tokens_map``
    (``bos_token=``, ``eos_token=``, ``unk_token=``, ...); None values are left out, as transformers leaves
    unset tokens out. Equal, byte for byte, to ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)`` in transformers 5.24 with that tokenizer. Any failure -> :class:`PromptError`.
    """
    if not isinstance(chat_template, str) or not chat_template:
        raise PromptError("the chat template is empty or not a string")
    template = _compile(chat_template)
    chat = _prepare(messages)
    tokens = _plain({k: v for k, v in special_tokens.items() if v is not None})
    try:
        return template.render(messages=chat, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **tokens)
    except RecursionError:
        raise PromptError("chat template failed: recursion too deep") from None
    except Exception as e:          # TemplateError (raise_exception, sandbox refusals), TypeError, ... from data
        raise PromptError(f"chat template failed: {one_line(e)}") from None


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
    them, the LLaVA-1.5 one does not. The same as :func:`render_messages` over :func:`build_messages`.
    """
    if not isinstance(user_text, str):
        raise PromptError(f"user text must be a string, got {type(user_text).__name__}")
    return render_messages(chat_template, build_messages(user_text, has_image, instruction),
                           add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
                           **special_tokens)


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
