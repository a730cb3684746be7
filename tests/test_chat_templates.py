"""Chat templates: the runtime renders what transformers renders, byte for byte; the exporter finds and checks them.

The oracle is transformers itself: ``tokenizer.apply_chat_template(..., tokenize=False)`` for rendering,
``LlavaProcessor.from_pretrained`` / ``AutoTokenizer.from_pretrained`` for which template a folder holds. The
corpus under ``tests/data/chat_templates/`` holds the published llava-hf templates (sources in its README).
A small WordLevel tokenizer built in code stands in for a checkpoint's tokenizer: nothing is downloaded.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
# the older llava-v1.6-mistral template writes '<\s>', which jinja's lexer warns about (in transformers too)
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")

from safeclip.export.templates import PROBES, TemplateError, chat_template_from_checkpoint, check_template  # noqa: E402
from safeclip.runtime import prompt as P  # noqa: E402
from safeclip.runtime.prompt import PromptError, build_messages, render, render_messages  # noqa: E402

CORPUS = Path(__file__).parent / "data" / "chat_templates"
CORPUS_FILES = sorted(CORPUS.glob("*.chat_template.json"))
LLAVA15 = CORPUS / "llava-1.5-7b-hf.chat_template.json"


def _template(path: Path) -> str:
    return json.loads(path.read_text(encoding="utf-8"))["chat_template"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "hello": 5}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _hf(tok, template, messages, add_generation_prompt=True):
    return tok.apply_chat_template(copy.deepcopy(messages), chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


def _ours(tok, template, messages, add_generation_prompt=True):
    return render_messages(template, copy.deepcopy(messages), add_generation_prompt=add_generation_prompt,
                           **tok.special_tokens_map)


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    P._compile.cache_clear()           # tests below patch the environment; never reuse a compiled template
    yield
    P._compile.cache_clear()


# --- the corpus of published templates -----------------------------------------------------------------------
def test_corpus_is_documented():
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert len(CORPUS_FILES) >= 3
    for f in CORPUS_FILES:
        assert f.name in readme, f"{f.name} has no source in the corpus README"
        assert "generation" in _template(f) or "[INST]" in _template(f)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name.split(".chat_template")[0])
@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p[0])
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
def test_corpus_renders_like_transformers(tok, path, probe, gen):
    template, (_, messages, _) = _template(path), probe
    expected = _hf(tok, template, messages, gen)       # every corpus template renders every probe in transformers
    assert _ours(tok, template, messages, gen) == expected


def test_llava15_matches_transformers_own_expectation(tok):
    # transformers' tests/models/llava/test_processor_llava.py::test_chat_template pins this string
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    assert _ours(tok, _template(LLAVA15), msgs) == "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    assert render(_template(LLAVA15), "What is shown in this image?", True) == \
        "USER: <image>\nWhat is shown in this image? ASSISTANT:"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name.split(".chat_template")[0])
def test_check_template_passes_on_corpus(tok, tmp_path, path):
    (tmp_path / "chat_template.json").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    template, source = chat_template_from_checkpoint(tmp_path)
    assert (template, source) == (_template(path), "chat_template.json")
    assert check_template(template, source, tok) == [name for name, _, _ in PROBES]


# --- transformers' extensions and globals ----------------------------------------------------------------------
GENERATION = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}<A>{{ m['content'] }}</A>"
              "{% endgeneration %}{% else %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}")
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]


def test_generation_tag_renders_its_body(tok):
    out = _ours(tok, GENERATION, CHAT)
    assert out == "[user] hi\n<A>hello</A>[user] ?\n" == _hf(tok, GENERATION, CHAT)
    # transformers' training path (assistant mask) renders the same text
    mask = tok.apply_chat_template(CHAT, chat_template=GENERATION, return_dict=True, return_assistant_tokens_mask=True)
    assert any(mask["assistant_masks"])


def test_raise_exception_is_a_prompt_error(tok):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    assert _ours(tok, template, CHAT) == "ok"
    with pytest.raises(PromptError, match="^chat template failed: Conversation must start with user$"):
        _ours(tok, template, [{"role": "system", "content": "x"}])
    with pytest.raises(Exception, match="Conversation must start with user"):
        _hf(tok, template, [{"role": "system", "content": "x"}])


def test_tojson_does_not_html_escape(tok):
    msgs = [{"role": "user", "content": "<b>&'Ü 漢字</b>"}]
    for template in ("{{ messages[0]['content'] | tojson }}", "{{ messages | tojson(indent=2, sort_keys=True) }}"):
        assert _ours(tok, template, msgs) == _hf(tok, template, msgs)
    assert _ours(tok, "{{ messages[0]['content'] | tojson }}", msgs) == '"<b>&\'Ü 漢字</b>"'


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% continue %}{% endif %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n        U:{{ m['content'] }}\n    {% endif %}\n{% endfor %}\n",
    "{%- for m in messages -%}\n  {{- m['role'] | upper }} {{ m['content'] | trim }}\n{%- endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ dict(a=1, b=messages | length) | tojson }}{{ dict.fromkeys(['x', 'y'], 0) }}",
    "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}{{ unk_token }}{{ pad_token }}{{ cls_token is defined }}",
    "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}",
    "{{ strftime_now('%Y') }}",
], ids=["break", "continue", "trim_lstrip", "whitespace_control", "namespace", "dict", "special_tokens", "vars",
        "strftime_now"])
def test_environment_matches_transformers(tok, template):
    assert _ours(tok, template, CHAT) == _hf(tok, template, CHAT)
    assert _ours(tok, template, CHAT, False) == _hf(tok, template, CHAT, False)


def test_messages_are_prepared_as_transformers_prepares_them(tok):
    template = ("{% for m in messages %}{{ m['role'] }}|{{ 'content' in m }}|{{ m.get('thinking') }}|"
                "{{ m.get('reasoning_content') }}|{% if m['content'] is not string and m['content'] %}"
                "{% for c in m['content'] %}{{ c['image'] if 'image' in c else c['text'] }},{% endfor %}"
                "{% endif %}\n{% endfor %}")
    msgs = [{"role": "user", "content": [{"type": "image", "image": np.zeros((2, 2))},
                                         {"type": "text", "text": "x", "n": np.int64(3)}]},
            {"role": "assistant", "content": None, "reasoning": "because"},
            {"role": "user", "content": [{"type": "text", "text": "y"}]}]
    out = _ours(tok, template, msgs)
    assert out == _hf(tok, template, msgs)
    assert "<ndarray>," in out and "assistant|False|because|because|" in out


def test_render_is_render_messages_of_one_user_turn(tok):
    template = _template(LLAVA15)
    for text, image, instruction in [("hi", False, None), ("What is it?", True, None), ("Q", True, "Be safe.")]:
        msgs = build_messages(text, image, instruction)
        assert render(template, text, image, instruction, **tok.special_tokens_map) == _hf(tok, template, msgs)
    with pytest.raises(PromptError, match="user text must be a string"):
        render(template, None, False)


# --- a sandbox: templates are untrusted data -----------------------------------------------------------------
@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ strftime_now.__globals__ }}{{ strftime_now.__globals__.os }}",
    "{{ namespace.__init__.__globals__['sys'] }}",
    "{{ dict.__call__.__globals__ }}{{ dict.__call__.__globals__.x }}",
    "{% set ns = namespace(_private=1) %}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_hostile_templates_are_refused(tok, template):
    with pytest.raises(PromptError, match="^chat template failed: "):
        _ours(tok, template, CHAT)
    with pytest.raises(Exception):          # transformers refuses them too
        _hf(tok, template, CHAT)


@pytest.mark.parametrize("bad,match", [
    ("{% generation %}unclosed", "does not compile"),
    ("{{ x | no_such_filter }}", "does not compile"),
    ("", "empty or not a string"),
])
def test_broken_templates_are_one_line_prompt_errors(bad, match):
    with pytest.raises(PromptError, match=match) as e:
        render_messages(bad, CHAT)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("messages,match", [([], "empty conversation"), ("hi", "list of dicts"),
                                            ([["user", "hi"]], "message 0 must be a dict")])
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(PromptError, match=match):
        render_messages(_template(LLAVA15), messages)


# --- check_template refuses what the runtime would render differently -----------------------------------------
def test_check_refuses_a_runtime_without_the_generation_tag(tok, monkeypatch):
    """The measured bug (issue #10): a runtime lacking transformers' tag cannot render llava-hf templates."""
    from jinja2.ext import loopcontrols
    monkeypatch.setattr(P, "_extensions", lambda: [loopcontrols])
    with pytest.raises(TemplateError, match=r"^chat_template.json: the runtime cannot render probe 'text'.*"
                                            r"unknown tag 'generation'"):
        check_template(_template(LLAVA15), "chat_template.json", tok)


def test_check_refuses_a_runtime_lacking_a_filter(tok, monkeypatch):
    orig = P._environment

    def without_tojson():
        env = orig()
        del env.filters["tojson"]
        return env
    monkeypatch.setattr(P, "_environment", without_tojson)
    template = "{% for m in messages %}<image>{{ m | tojson }}{% endfor %}"
    with pytest.raises(TemplateError, match="^my_template.jinja: the runtime cannot render probe 'text'.*tojson"):
        check_template(template, "my_template.jinja", tok)


IMAGES_THEN_JSON = ("{% for m in messages %}{% for c in m['content'] if c is mapping and c['type'] == 'image' %}"
                    "<image>{% endfor %}{{ m['content'] | tojson }}{% endfor %}")


def test_check_refuses_divergent_output_naming_file_and_probe(tok, monkeypatch):
    import jinja2.filters
    orig = P._environment

    def html_tojson():                    # jinja's own tojson: sorts keys, HTML-escapes and ASCII-escapes
        env = orig()
        env.filters["tojson"] = jinja2.filters.do_tojson
        return env
    monkeypatch.setattr(P, "_environment", html_tojson)
    with pytest.raises(TemplateError, match=r"^chat_template.jinja: probe 'text' renders differently in the "
                                            r"runtime \(at char 4: transformers .* vs runtime .*\)$"):
        check_template(IMAGES_THEN_JSON, "chat_template.jinja", tok)


def test_check_catches_a_difference_in_the_non_ascii_probe_only(tok, monkeypatch):
    orig = P._environment

    def ascii_tojson():                   # a runtime that escapes non-ASCII: only the non-ASCII probe shows it
        env = orig()
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=True)
        return env
    assert "non-ascii" in check_template(IMAGES_THEN_JSON, "chat_template.jinja", tok)
    P._compile.cache_clear()
    monkeypatch.setattr(P, "_environment", ascii_tojson)
    with pytest.raises(TemplateError, match=r"^chat_template.jinja: probe 'non-ascii' renders differently.*"
                                            r"\\\\u00dc"):
        check_template(IMAGES_THEN_JSON, "chat_template.jinja", tok)


def test_check_refuses_a_template_that_drops_images(tok):
    text_only = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{{ m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
                 "| join(' ') }}{% endif %}\n{% endfor %}")
    with pytest.raises(TemplateError, match=r"^tokenizer_config.json: probe 'image' with 1 image\(s\) renders 0 "
                                            r"'<image>' placeholder"):
        check_template(text_only, "tokenizer_config.json", tok)


def test_check_skips_probes_transformers_refuses(tok):
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                 "{% endif %}{{ m['role'] }}: {% for c in m['content'] %}{{ '<image>' if c['type'] == 'image' "
                 "else c['text'] }}{% endfor %}\n{% endfor %}")
    passed = check_template(no_system, "chat_template.jinja", tok)
    assert "system+multi-turn" not in passed and "string content" in passed and "image" in passed
    with pytest.raises(TemplateError, match="renders none of the probe conversations.*refuses everything"):
        check_template("{{ raise_exception('refuses everything') }}", "chat_template.jinja", tok)


# --- where the template comes from: transformers' precedence ---------------------------------------------------
JSON_T, JINJA_T, TOK_T, PROC_T, TOOL_T = ("{{ 'json' }}", "{{ 'jinja' }}", "{{ 'tokenizer' }}", "{{ 'proc' }}",
                                          "{{ 'tool' }}")


def _folder(tmp_path, tok, files: dict, tokenizer_template=None) -> Path:
    """A tiny LLaVA-processor checkpoint folder (tokenizer + image processor) plus the given template files."""
    from transformers import CLIPImageProcessor

    d = tmp_path / "ckpt"
    d.mkdir()
    t = copy.deepcopy(tok)
    t.chat_template = None
    t.save_pretrained(d)
    for f in ("chat_template.jinja", "chat_template.json"):
        (d / f).unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if tokenizer_template is not None:
        cfg["chat_template"] = tokenizer_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    CLIPImageProcessor().save_pretrained(d)
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text if isinstance(text, str) else json.dumps(text), encoding="utf-8")
    return d


def _transformers_template(folder: Path) -> str:
    """What transformers renders with: the processor's template, else the tokenizer's (raises like it does)."""
    from transformers import AutoTokenizer, LlavaProcessor

    proc = LlavaProcessor.from_pretrained(folder)
    if proc.chat_template is not None:
        return proc._resolve_chat_template(None)
    return AutoTokenizer.from_pretrained(folder).get_chat_template()


@pytest.mark.parametrize("files,tokenizer_template,expected", [
    ({"chat_template.json": {"chat_template": JSON_T}}, None, (JSON_T, "chat_template.json")),
    ({"chat_template.jinja": JINJA_T}, None, (JINJA_T, "chat_template.jinja")),
    ({"chat_template.json": {"chat_template": JSON_T}, "chat_template.jinja": JINJA_T}, None,
     (JSON_T, "chat_template.json")),
    ({}, TOK_T, (TOK_T, "tokenizer_config.json")),
    ({}, [{"name": "tool_use", "template": TOOL_T}, {"name": "default", "template": TOK_T}],
     (TOK_T, "tokenizer_config.json")),
    ({"chat_template.json": {"chat_template": JSON_T}}, TOK_T, (JSON_T, "chat_template.json")),
    ({"chat_template.jinja": JINJA_T}, TOK_T, (JINJA_T, "chat_template.jinja")),
    ({"chat_template.jinja": JINJA_T, "additional_chat_templates/tool_use.jinja": TOOL_T}, TOK_T,
     (JINJA_T, "chat_template.jinja")),
    ({"additional_chat_templates/default.jinja": JINJA_T, "additional_chat_templates/tool_use.jinja": TOOL_T}, None,
     (JINJA_T, "additional_chat_templates/default.jinja")),
    ({"processor_config.json": {"chat_template": PROC_T}, "chat_template.json": {"chat_template": JSON_T}}, None,
     (PROC_T, "processor_config.json")),
], ids=["json", "jinja", "json_over_jinja", "tokenizer_string", "tokenizer_named_list", "processor_over_tokenizer",
        "jinja_over_tokenizer", "jinja_with_named_extras", "extras_default", "processor_config_key"])
def test_template_source_precedence(tmp_path, tok, files, tokenizer_template, expected):
    folder = _folder(tmp_path, tok, files, tokenizer_template)
    assert chat_template_from_checkpoint(folder) == expected
    assert _transformers_template(folder) == expected[0]


@pytest.mark.parametrize("files,tokenizer_template,match", [
    ({}, [{"name": "a", "template": JSON_T}, {"name": "b", "template": TOK_T}], "none named 'default'"),
    ({"additional_chat_templates/tool_use.jinja": TOOL_T}, TOK_T, "none named 'default'"),
    ({"chat_template.json": {"chat_template": JSON_T}, "additional_chat_templates/tool_use.jinja": TOOL_T}, None,
     "conflicting template files"),
], ids=["named_list_without_default", "extras_without_default", "json_with_extras"])
def test_ambiguous_sources_are_refused_as_transformers_refuses_them(tmp_path, tok, files, tokenizer_template, match):
    folder = _folder(tmp_path, tok, files, tokenizer_template)
    with pytest.raises(TemplateError, match=match):
        chat_template_from_checkpoint(folder)
    with pytest.raises(ValueError):
        _transformers_template(folder)


def test_no_template_is_one_clear_refusal(tmp_path, tok):
    folder = _folder(tmp_path, tok, {})
    with pytest.raises(TemplateError) as e:
        chat_template_from_checkpoint(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "no chat template found" in msg
    for f in ("chat_template.json", "chat_template.jinja", "tokenizer_config.json", "processor_config.json"):
        assert f in msg
    with pytest.raises(ValueError):
        _transformers_template(folder)
    with pytest.raises(TemplateError, match="not a checkpoint folder"):
        chat_template_from_checkpoint(tmp_path / "missing")
    (folder / "chat_template.json").write_text("{not json")
    with pytest.raises(TemplateError, match="chat_template.json: unreadable JSON"):
        chat_template_from_checkpoint(folder)


def test_demo_model_ships_the_published_llava_1_5_template():
    """The built-in demo renders llava-hf's published template (generation tag included), not a look-alike."""
    from safeclip.export.demo import LLAVA_CHAT_TEMPLATE

    published = json.loads((Path(__file__).parent / "data" / "chat_templates" /
                            "llava-1.5-7b-hf.chat_template.json").read_text())["chat_template"]
    assert LLAVA_CHAT_TEMPLATE == published


def test_export_refuses_a_template_the_runtime_renders_differently(tmp_path, monkeypatch, capsys):
    """The exporter's own check, end to end: a runtime rendering that differs from transformers' on a probe stops
    the export before any graph is written, with one line naming the checkpoint's template file; no bundle,
    no temporary folder."""
    from safeclip.export import cli, templates
    from safeclip.export.demo import build_demo

    llava, clip = build_demo(tmp_path / "src")
    real = templates.render_messages

    def drifted(template, messages, **kw):          # what a renderer lacking one transformers feature does
        return real(template, messages, **kw).replace("ASSISTANT:", "ASSISTANT: ")

    monkeypatch.setattr(templates, "render_messages", drifted)
    traced = []
    import safeclip.export.bundle as bundle
    monkeypatch.setattr(bundle, "export_vision_gate", lambda *a, **k: traced.append(1))
    out = tmp_path / "out" / "b"
    assert cli.main(["--model", str(llava), "--clip", str(clip), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 + sum(1 for line in err if line.startswith("[")), err     # progress lines + one error
    assert err[-1].startswith("safeclip-export: error: ") and "chat_template.jinja" in err[-1], err[-1]
    assert traced == []                               # refused before the long work
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []
