"""The bundle's chat template: where it comes from in a checkpoint, and a check that the runtime renders it.

Supported sources, with transformers 5.24's own precedence (``ProcessorMixin.get_processor_dict`` and
``PreTrainedTokenizerBase.from_pretrained`` / ``get_chat_template``, read at 5.24.0). A LLaVA prompt is built
by the processor (``LlavaProcessor.apply_chat_template``), so the processor's template comes first and the
tokenizer's is the fallback:

1. ``processor_config.json``'s ``chat_template`` key (transformers keeps it over the files, with a warning);
2. ``chat_template.json`` (the legacy processor file llava-hf publishes): ``{"chat_template": "..."}``;
   combined with ``additional_chat_templates/`` it is refused, as transformers refuses it;
3. ``chat_template.jinja`` (processor and tokenizer share this file), with ``additional_chat_templates/*.jinja``
   as named templates: the default is ``chat_template.jinja``, else ``additional_chat_templates/default.jinja``;
4. ``tokenizer_config.json``'s ``chat_template``: a string, or a list of ``{"name", "template"}`` of which the
   one named ``default`` is taken (as ``get_chat_template`` takes it when no tools are passed).

Named templates without a ``default`` are refused (transformers raises on them too); no template at all is
refused with one line naming the folder and the files looked for. Nothing is guessed.

:func:`check_template` renders probe conversations with transformers and with the runtime's
:func:`safeclip.runtime.prompt.render_messages` and refuses a template that renders differently, or that does
not place exactly one image placeholder per image: a bundle that cannot render its own template is never
written. The exporter calls both before it writes the bundle.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from safeclip.runtime.error_text import one_line
from safeclip.runtime.prompt import PromptError, render_messages

__all__ = ["TemplateError", "chat_template_from_checkpoint", "check_template", "PROBES"]

LOOKED_FOR = ("processor_config.json 'chat_template'", "chat_template.json", "chat_template.jinja",
              "additional_chat_templates/*.jinja", "tokenizer_config.json 'chat_template'")
EXTRA_DIR = "additional_chat_templates"


class TemplateError(ValueError):
    """A checkpoint without a usable chat template, or a template the runtime does not render as transformers."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TemplateError(f"{path}: unreadable JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: unreadable template ({one_line(e)})") from None


def _default_of(templates: dict[str, tuple[str, str]], folder: Path, where: str) -> tuple[str, str]:
    """The ``default`` of named templates {name: (text, source)}, or a refusal naming them."""
    if "default" in templates:
        return templates["default"]
    raise TemplateError(f"{folder}: {where} holds named chat templates ({', '.join(sorted(templates))}) but none "
                        f"named 'default'; transformers refuses to pick one, so does the exporter")


def _checked(text: Any, source: str, folder: Path) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise TemplateError(f"{folder}: {source} holds no chat template text (got {type(text).__name__})")
    return text, source


def chat_template_from_checkpoint(folder) -> tuple[str, str]:
    """(template text, source file name) of a checkpoint folder, with transformers' precedence (see module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TemplateError(f"{folder}: not a checkpoint folder")
    # 1. processor_config.json's own key wins over the template files
    proc_cfg = folder / "processor_config.json"
    if proc_cfg.is_file():
        value = _read_json(proc_cfg).get("chat_template")
        if isinstance(value, dict):
            return _checked(*_default_of({k: (v, "processor_config.json") for k, v in value.items()},
                                         folder, "processor_config.json"), folder)
        if value is not None:
            return _checked(value, "processor_config.json", folder)
    extra_dir = folder / EXTRA_DIR
    extras = {p.stem: (_read_text(p), f"{EXTRA_DIR}/{p.name}")
              for p in sorted(extra_dir.glob("*.jinja"))} if extra_dir.is_dir() else {}
    # 2. the legacy processor file
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        if extras:
            raise TemplateError(f"{folder}: chat_template.json together with {EXTRA_DIR}/ is refused by "
                                f"transformers (conflicting template files); keep one of them")
        data = _read_json(legacy)
        if "chat_template" not in data:
            raise TemplateError(f"{legacy}: no 'chat_template' key")
        return _checked(data["chat_template"], "chat_template.json", folder)
    # 3. chat_template.jinja (+ named templates)
    raw = folder / "chat_template.jinja"
    if raw.is_file():
        extras["default"] = (_read_text(raw), "chat_template.jinja")
    if extras:
        return _checked(*_default_of(extras, folder, f"chat_template.jinja / {EXTRA_DIR}/"), folder)
    # 4. the tokenizer's config
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        value = _read_json(tok_cfg).get("chat_template")
        if isinstance(value, (list, tuple)):
            try:
                named = {t["name"]: (t["template"], "tokenizer_config.json") for t in value}
            except (TypeError, KeyError):
                raise TemplateError(f"{tok_cfg}: 'chat_template' list entries need 'name' and 'template'") from None
            return _checked(*_default_of(named, folder, "tokenizer_config.json"), folder)
        if value is not None:
            return _checked(value, "tokenizer_config.json", folder)
    raise TemplateError(f"{folder}: no chat template found (looked for {', '.join(LOOKED_FOR)})")


# --- the check -----------------------------------------------------------------------------------------------
def _text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}
# (name, messages, images in it). Content as lists of parts (what LLaVA templates read) and one plain string.
PROBES: tuple[tuple[str, list, int], ...] = (
    ("text", [{"role": "user", "content": [_text("What is in the picture?")]}], 0),
    ("image", [{"role": "user", "content": [IMAGE, _text("What is in the picture?")]}], 1),
    ("image+instruction", [{"role": "user", "content": [
        IMAGE, _text("The image may show violence. Answer safely."), _text("Describe it.")]}], 1),
    ("string content", [{"role": "user", "content": "Hello, who are you?"}], 0),
    ("system+multi-turn", [
        {"role": "system", "content": [_text("You are a careful assistant.")]},
        {"role": "user", "content": [IMAGE, _text("What is shown?")]},
        {"role": "assistant", "content": [_text("A red house by a lake.")]},
        {"role": "user", "content": [_text("And the weather?")]}], 1),
    ("multi-turn", [
        {"role": "user", "content": [IMAGE, _text("What is shown?")]},
        {"role": "assistant", "content": [_text("A red house by a lake.")]},
        {"role": "user", "content": [_text("And the weather?")]}], 1),
    ("non-ascii", [{"role": "user", "content": [IMAGE, _text("Ünïcödé 漢字 🙂 — «quotes» & <tags> 'x'")]}], 1),
)


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 20)
    return f"at char {i}: transformers {a[lo:i + 20]!r} vs runtime {b[lo:i + 20]!r}"


def check_template(template: str, source: str, tokenizer, *, image_token: str = "<image>") -> list[str]:
    """Render :data:`PROBES` with transformers and with the runtime; returns the names of the probes that passed.

    transformers renders with ``tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
    add_generation_prompt=True)``; the runtime with ``render_messages(..., **tokenizer.special_tokens_map)``, so
    the bundle must hand the runtime the same special tokens. A probe transformers itself refuses (the template
    raises, e.g. a system turn it does not support) is skipped for both. Raises :class:`TemplateError` on one
    line naming ``source`` and the first probe that differs, that the runtime cannot render, or whose prompt does
    not hold one ``image_token`` per image; also when transformers renders no probe at all.
    """
    specials = dict(tokenizer.special_tokens_map)
    passed, skipped = [], []
    for name, messages, n_images in PROBES:
        try:
            expected = tokenizer.apply_chat_template(copy.deepcopy(messages), chat_template=template,
                                                     tokenize=False, add_generation_prompt=True)
        except Exception as e:      # transformers refuses this conversation: not a runtime problem
            skipped.append(f"{name} ({one_line(e)})")
            continue
        try:
            got = render_messages(template, copy.deepcopy(messages), add_generation_prompt=True, **specials)
        except PromptError as e:
            raise TemplateError(f"{source}: the runtime cannot render probe '{name}' that transformers renders "
                                f"({e})") from None
        if got != expected:
            raise TemplateError(f"{source}: probe '{name}' renders differently in the runtime "
                                f"({_first_difference(expected, got)})")
        if expected.count(image_token) != n_images:
            raise TemplateError(f"{source}: probe '{name}' with {n_images} image(s) renders "
                                f"{expected.count(image_token)} '{image_token}' placeholder(s); the runtime "
                                f"needs exactly one per image")
        passed.append(name)
    if not passed:
        raise TemplateError(f"{source}: transformers renders none of the probe conversations "
                            f"({'; '.join(skipped)})")
    return passed
