"""Real tokenizer vocabularies end to end: export, prompt ids, greedy text and streaming, against transformers.

Vocabularies (``_vocab.py``; files, versions and licences in ``tests/data/vocab/README.md``): Llama-2 /
Vicuna SentencePiece with byte fallback and Mistral's SentencePiece models (committed), Llama-3 and Qwen2
byte-level BPE (extracted from llama-cpp-python's sdist by ``scripts/fetch_test_vocab.py``; skipped, naming
that command, when absent).

* End to end (``E2E``: Llama-2 + llava-1.5 template, Mistral v1 + Mistral text model + llava-v1.6-mistral
  template, Llama-3 + llava-1.5 template; templates as llava-hf publishes them, tests/data/chat_templates):
  a tiny random LLaVA on the real vocabulary (``_tiny_llava.py``) goes through ``export_bundle``;
  ``Pipeline`` prompt ids must equal ``LlavaProcessor``'s, greedy token ids and text must equal transformers'
  ``generate`` + ``decode(skip_special_tokens=True)``, and the streamed pieces must add up to that text.
  A planted token chain makes byte-fallback characters split across tokens, a special token inside a
  character, an invalid byte run and leading-space tokens occur every time.
* Prompt ids only (``PROMPT_ONLY``, no export): Mistral v3 (control tokens such as ``[INST]`` are special),
  Qwen2, and Meta's legacy Llama-2 pipeline, tokenized by the runtime from the ``tokenizer.json`` the exporter
  would write (``AutoTokenizer`` of the checkpoint, backend saved); and templates that print the BOS
  themselves (``BOS_PRINTED``) get exactly one.
* Unit level: the runtime's detokenizer against ``decode`` on random id sequences for every vocabulary, and
  llama.cpp's ``.inp``/``.out`` vectors (or SentencePiece itself for the ``.model`` files) for the encoders.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import _tiny_llava as T  # noqa: E402
import _vocab as V  # noqa: E402
from safeclip.runtime import generate as G  # noqa: E402
from safeclip.runtime.prompt import render, tokenize  # noqa: E402

LLAVA_15_TEMPLATE = T.published_template("llava-1.5-7b-hf.chat_template.json")       # with {% generation %}
MISTRAL_TEMPLATE = T.published_template("llava-v1.6-mistral-7b-hf.chat_template.json")
E2E = {
    "llama2": T.Case("llama2", LLAVA_15_TEMPLATE, "llama", "spm", "<s>"),
    "mistral-v1": T.Case("mistral-v1", MISTRAL_TEMPLATE, "mistral", "spm", "<s>"),
    "llama3": T.Case("llama3", LLAVA_15_TEMPLATE, "llama", "bpe", "<|begin_of_text|>"),
}
PROMPT_ONLY = {
    "mistral-v3": T.Case("mistral-v3", MISTRAL_TEMPLATE, "mistral", "spm", "[INST]"),
    "qwen2": T.Case("qwen2", LLAVA_15_TEMPLATE, "llama", "bpe", "<|im_start|>"),
    "llama2-legacy": T.Case("llama2-legacy", LLAVA_15_TEMPLATE, "llama", "spm", "<s>"),
}
# templates that print the BOS themselves (as Llama-3-style ones do): the tokenizer must not add a second one
BOS_PRINTED = {
    "llama2+bos": T.Case("llama2", "{{ bos_token }}" + LLAVA_15_TEMPLATE, "llama", "spm", "<s>"),
    "llama3+bos": T.Case("llama3", "{{ bos_token }}" + LLAVA_15_TEMPLATE, "llama", "bpe", "<|begin_of_text|>"),
}
CASES = {**E2E, **PROMPT_ONLY, **BOS_PRINTED}
PROMPTS = [
    "What is in the picture?",
    "   three leading spaces, and a trailing one ",
    "Ünïcödé café, 東京, emoji 🦙👍🏽 and a flag 🇫🇷",
    "rare characters fall back to bytes: ꙮ 𝔘𝔫𝔦 ☃\u200d ѱ",
    "special strings as text: </s> <s> <unk> <pad> [INST] [/INST] <|begin_of_text|> <|im_start|> <|endoftext|>",
    "\ttab, new\nline\n\n  and spaces",
]


# --- checkpoints and bundles (built once per session, on demand) -------------------------------------------
@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return T.build_clip(tmp_path_factory.mktemp("real-vocab") / "clip")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("real-vocab-ckpt"), {}

    def get(name: str):
        if name not in built:
            built[name] = (root / name, T.build(CASES[name], root / name))
        return built[name]
    return get


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, checkpoints, clip_dir):
    from safeclip.export.bundle import ExportOptions, export_bundle
    from safeclip.runtime.pipeline import Pipeline

    root, built = tmp_path_factory.mktemp("real-vocab-bundles"), {}

    def get(name: str):
        if name not in built:
            folder, facts = checkpoints(name)
            out = export_bundle(ExportOptions(model=str(folder), clip=str(clip_dir), out=root / name)).bundle
            built[name] = (Pipeline.load(out), folder, facts)
        return built[name]
    return get


@functools.lru_cache(maxsize=None)
def _processor(folder: str):
    from transformers import LlavaProcessor
    return LlavaProcessor.from_pretrained(folder)


@functools.lru_cache(maxsize=None)
def _hf_model(folder: str):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(folder).eval()


def processor_inputs(folder, prompt: str, image):
    """The oracle's prompt: LlavaProcessor's chat template, image-token expansion and tokenization."""
    proc = _processor(str(folder))
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    tokenize=False)
    return proc, proc(text=text, images=None if image is None else [image], return_tensors="pt")


def runtime_ids(tokenizer, template: str, specials: dict, image_token_id: int, image_seq_length: int,
                prompt: str, has_image: bool) -> list[int]:
    """What ``AnswerStream`` feeds the decoder: ``prompt.render`` then ``prompt.tokenize``."""
    text = render(template, prompt, has_image, None, **specials)
    return tokenize(tokenizer, text, image_token_id, image_seq_length, bos_token=specials.get("bos_token"),
                    num_images=int(has_image)).tolist()


def _image(test_images):
    from PIL import Image
    return Image.open(test_images / "red.png").convert("RGB")


# --- end to end: export, prompt ids, greedy text, streaming ------------------------------------------------
@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("name", list(E2E))
def test_bundle_prompt_ids_equal_llava_processor(bundles, test_images, name, with_image):
    pipe, folder, facts = bundles(name)
    lm = pipe.language_model
    assert lm.image_token_id == facts["image_token_id"] and lm.decoder.vocab_size == facts["vocab_size"]
    image = _image(test_images) if with_image else None
    for prompt in PROMPTS:
        _, ref = processor_inputs(folder, prompt, image)
        ids = runtime_ids(lm.tokenizer, lm.template, lm.special_tokens, lm.image_token_id,
                          pipe.image_tokens(None), prompt, with_image)
        assert ids == ref["input_ids"][0].tolist(), prompt
        assert ids.count(lm.image_token_id) == T.IMAGE_TOKENS * int(with_image)


@pytest.mark.parametrize("prompt", [PROMPTS[2], PROMPTS[4]], ids=["unicode", "special-strings"])
@pytest.mark.parametrize("name", list(E2E))
def test_greedy_text_and_stream_equal_transformers(bundles, test_images, name, prompt):
    pipe, folder, facts = bundles(name)
    image, chain = _image(test_images), facts["chain"]
    n = len(chain) + 12                                    # the planted chain, then random tokens
    proc, ref_in = processor_inputs(folder, prompt, image)
    np.testing.assert_allclose(pipe.pixel_values(image), ref_in["pixel_values"].numpy(), atol=1e-5)
    with torch.no_grad():
        out = _hf_model(str(folder)).generate(**ref_in, max_new_tokens=n, do_sample=False)
    ref_ids = out[0, ref_in["input_ids"].shape[1]:].tolist()
    ref_text = proc.tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert ref_ids[:len(chain)] == chain                   # the controlled part really ran
    assert "€" in ref_text and "🦙" in ref_text and "\ufffd" in ref_text and "\n" in ref_text

    # policy annotate: the random gate may flag the image, and the prompt must stay the user's own
    a = pipe.generate(image, prompt, max_new_tokens=n, policy="annotate")
    assert a.action in ("generated", "annotated")
    assert list(a.token_ids) == ref_ids and a.prompt_tokens == ref_in["input_ids"].shape[1]
    assert a.text == ref_text
    s = pipe.stream(image, prompt, max_new_tokens=n, policy="annotate")
    pieces = list(s)
    assert "".join(pieces) == ref_text == s.result.text and list(s.result.token_ids) == ref_ids
    # characters split over byte tokens (one with a special token inside) arrive whole, in one piece
    assert any("€" in p for p in pieces) and any("🦙" in p for p in pieces)


def test_text_only_prompt_equals_transformers(bundles):
    pipe, folder, facts = bundles("llama2")
    proc, ref_in = processor_inputs(folder, PROMPTS[3], None)
    with torch.no_grad():
        out = _hf_model(str(folder)).generate(**ref_in, max_new_tokens=len(facts["chain"]) + 4, do_sample=False)
    ref_ids = out[0, ref_in["input_ids"].shape[1]:].tolist()
    a = pipe.generate(None, PROMPTS[3], max_new_tokens=len(ref_ids))
    assert list(a.token_ids) == ref_ids and a.text == proc.tokenizer.decode(ref_ids, skip_special_tokens=True)


# --- prompt ids on more vocabularies (no export) ------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROMPT_ONLY))
def test_prompt_ids_equal_llava_processor(checkpoints, tmp_path, test_images, name):
    folder, facts = checkpoints(name)
    tok, runtime_tok, specials = _exporter_tokenizer(folder, tmp_path)
    seq = json.loads((folder / "config.json").read_text())["image_seq_length"]
    for with_image in (True, False):
        image = _image(test_images) if with_image else None
        for prompt in PROMPTS:
            _, ref = processor_inputs(folder, prompt, image)
            ids = runtime_ids(runtime_tok, tok.chat_template, specials, facts["image_token_id"], seq, prompt, with_image)
            assert ids == ref["input_ids"][0].tolist(), prompt
    if name == "mistral-v3":                               # control tokens in the template are single ids
        ids = runtime_tok.encode(render(tok.chat_template, "hi", False)).ids
        assert runtime_tok.token_to_id("[INST]") in ids and runtime_tok.token_to_id("[/INST]") == ids[-1]


def _exporter_tokenizer(folder, tmp_path):
    """The tokenizer the exporter writes (``AutoTokenizer`` of the checkpoint, backend saved), reloaded as
    the runtime loads it, and the special tokens the manifest records."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    specials = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(tok, k)}
    return tok, Tokenizer.from_file(str(tmp_path / "tokenizer.json")), specials


@pytest.mark.parametrize("name", list(BOS_PRINTED))
def test_template_printing_bos_gets_one_bos(checkpoints, tmp_path, test_images, name):
    """Oracle: the processor's own ``apply_chat_template(tokenize=True)``, which drops the tokenizer's BOS
    when the rendered text starts with it (as ``prompt.tokenize`` does)."""
    folder, facts = checkpoints(name)
    tok, runtime_tok, specials = _exporter_tokenizer(folder, tmp_path)
    proc = _processor(str(folder))
    for with_image in (True, False):
        content = [{"type": "image", "image": _image(test_images)}] if with_image else []
        msgs = [{"role": "user", "content": content + [{"type": "text", "text": PROMPTS[1]}]}]
        ref = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ref = list(ref[0] if isinstance(ref[0], list) else ref)
        ids = runtime_ids(runtime_tok, tok.chat_template, specials, facts["image_token_id"], T.IMAGE_TOKENS,
                          PROMPTS[1], with_image)
        assert ids == ref and ids.count(tok.bos_token_id) == 1


# --- unit level: the detokenizer on real vocabularies ---------------------------------------------------------
def _stream_pieces(backend, ids):
    d = G._Detokenizer(backend)
    return [d.push(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("name", list(V.VOCABS))
def test_detokenizer_equals_decode_on_random_ids(name):
    hf = V.hf_tokenizer(name, llava_tokens=True)            # the oracle: transformers' decode
    backend = hf.backend_tokenizer                          # what the runtime holds (a tokenizers.Tokenizer)
    kind = "spm" if name.startswith(("llama2", "mistral")) else "bpe"
    byte_ids = V.split_utf8_ids(backend, kind)
    assert len(byte_ids) == 256
    specials = sorted(set(hf.all_special_ids))
    rng = V.rng_for(name)
    sequences = [V.random_ids(rng, int(rng.integers(1, 24)), len(hf), byte_ids, specials) for _ in range(300)]
    text = "Ünïcödé 東京 🦙👍🏽 ꙮ 𝔘 ☃ \n\t  x"
    sequences.append(backend.encode(text, add_special_tokens=False).ids)
    sequences.append([backend.token_to_id(t) for t in V.byte_tokens("€🦙".encode(), kind)])
    for ids in map(list, sequences):
        ref = hf.decode(ids, skip_special_tokens=True)
        pieces = _stream_pieces(backend, ids)
        assert "".join(pieces) == ref, (ids, pieces, ref)
    assert "".join(_stream_pieces(backend, sequences[-2])) == text


def test_byte_run_is_held_until_it_ends():
    """tokenizers' ByteFallback turns an invalid run of byte tokens into U+FFFD per byte, ASCII bytes too:
    streaming 'V' as soon as <0x56> arrived (as the plain prefix-offset method did) broke the sum."""
    backend = V.backend_tokenizer("llama2")
    b = {x: backend.token_to_id(f"<0x{x:02X}>") for x in (0x56, 0x92, 0xE2, 0x82, 0xAC)}
    hello, bos = backend.token_to_id("▁Hello"), backend.token_to_id("<s>")
    d = G._Detokenizer(backend)
    assert d.push(hello) == "Hello" and d.push(b[0x56]) == ""              # held: the run may go on
    assert d.push(b[0x92]) == "" and d.push(hello) == "�� Hello"           # as decode() renders the run
    assert backend.decode([b[0x56], b[0x92]]) == "��"
    d = G._Detokenizer(backend)                                             # a skipped special inside '€'
    assert [d.push(i) for i in (b[0xE2], bos, b[0x82], b[0xAC])] == ["", "", "", ""] and d.flush() == "€"


# --- unit level: encoders against llama.cpp's vectors and SentencePiece ------------------------------------
def _without_dummy_prefix(tokens: list[str]) -> list[str]:
    first = tokens[0][1:]
    return ([first] if first else []) + tokens[1:]


@pytest.mark.parametrize("name", [n for n, v in V.VOCABS.items() if v.vectors])
def test_encoder_matches_llama_cpp_vectors(name):
    """The vectors hold the vendor's HF tokenizer's ids (``add_special_tokens=False``). Exact for Meta's
    Llama-2 and Llama-3 pipelines and for Qwen2; transformers 5's Llama pipeline differs exactly on text
    that starts with a space, where it tokenizes as SentencePiece would without its dummy-prefix '▁'."""
    backend = V.backend_tokenizer(name)
    vectors = V.read_vectors(V.VOCABS[name].vectors)
    spaced = 0
    for text, ref in vectors:
        ids = backend.encode(text, add_special_tokens=False).ids
        if name == "llama2" and text.startswith(" "):
            spaced += 1
            got = [backend.id_to_token(i) for i in ids]
            assert got == _without_dummy_prefix([backend.id_to_token(i) for i in ref]), text
        else:
            assert ids == ref, text
    assert spaced == (15 if name == "llama2" else 0)


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_mistral_encoder_matches_sentencepiece(name):
    """SentencePiece itself is the reference for the ``.model`` files: Meta's legacy pipeline on the
    converted vocab and merges is exact; transformers 5's differs only on text starting with a space."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(V.vocab_path(V.VOCABS[name].file)))
    backend = V.backend_tokenizer(name)
    legacy = Tokenizer.from_str(json.dumps(V._legacy_llama(json.loads(backend.to_str()))))
    rng = np.random.default_rng(5)
    alphabet = list(" \n\tabcdeéö東🦙ꙮ,.!?'0123456789")
    texts = [t for t, _ in V.read_vectors("ggml-vocab-llama-spm.gguf")] + PROMPTS[:4] + [PROMPTS[5]] + \
        ["".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))) for _ in range(300)]
    for text in texts:
        ref = sp.encode(text)
        assert legacy.encode(text, add_special_tokens=False).ids == ref, text
        ids = backend.encode(text, add_special_tokens=False).ids
        if text.startswith(" "):
            assert [backend.id_to_token(i) for i in ids] == _without_dummy_prefix([sp.id_to_piece(i) for i in ref])
        else:
            assert ids == ref, text
            assert backend.decode(ids) == sp.decode(ref), text
    assert backend.encode("hi").ids[0] == sp.bos_id() == backend.token_to_id("<s>")
