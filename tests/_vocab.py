"""Real tokenizer vocabularies for tests, and tiny random LLaVA checkpoints that use them.

Where the files come from (see ``tests/data/vocab/README.md`` for versions and licences):

* committed under ``tests/data/vocab/``: llama.cpp's ``ggml-vocab-llama-spm.gguf`` (Llama-2 / Vicuna
  SentencePiece with byte fallback, + its ``.inp``/``.out`` test vectors) and Mistral's SentencePiece models
  ``tokenizer.model.v1`` (Mistral-7B v0.1/v0.2, LLaVA-NeXT-Mistral) and ``..._240323.model.v3`` (v0.3, with
  control tokens such as ``[INST]``);
* too large to commit, extracted at install time from llama-cpp-python's PyPI sdist by
  ``scripts/fetch_test_vocab.py`` (``.ci/run`` runs it) into :func:`fetched_dir`: ``ggml-vocab-llama-bpe.gguf``
  (Llama-3 byte-level BPE) and ``ggml-vocab-qwen2.gguf``, with their vectors. Tests needing them skip,
  naming the command, when they are absent.

:func:`hf_tokenizer` turns each file into a transformers tokenizer *in the form the model vendor ships it*.
transformers' GGUF converter does not give that form for two of them, and the llama.cpp vectors show it:

* Llama-3 (``llama-bpe``): Meta's ``tokenizer.json`` has ``ignore_merges: true`` (a word found in the vocab is
  one token, whatever the merges say) and a post-processor that adds ``<|begin_of_text|>``; the converter
  sets neither and adds a stray ``<|endoftext|>`` at id 128256. Built here as Meta ships it.
* Llama-2 (``llama-spm``) and the Mistral models: transformers 5 builds every ``LlamaTokenizer`` with a
  ``Metaspace(prepend_scheme="first")`` pre-tokenizer, which does not add the ``▁`` prefix to text that
  already starts with a space, where SentencePiece does (`" Hello"`: ``▁Hello`` vs ``▁ ▁Hello``). That *is*
  what transformers 5.x loads for a llava-hf checkpoint (its ``tokenizer_class`` is ``LlamaTokenizer``),
  so it is the form the exporter copies; ``llama2-legacy`` is Meta's shipped pipeline (normalizer
  ``Prepend("▁")`` + ``Replace(" ", "▁")``, no pre-tokenizer), which matches SentencePiece exactly.
* Mistral (``tokenizer.model``): transformers 5 ranks the BPE merges it derives by piece id, not score, which
  splits runs of spaces unlike SentencePiece (:func:`_merges_by_score`); here they are ranked by score, as
  SentencePiece applies them (a checkpoint's ``tokenizer.json`` carries its merges, so it is not converted).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

LLAMA_CPP_PYTHON = "0.3.36"           # the sdist the fetched files come from (scripts/fetch_test_vocab.py)
COMMITTED = Path(__file__).resolve().parent / "data" / "vocab"
FETCH_HINT = "python scripts/fetch_test_vocab.py"


def fetched_dir() -> Path:
    """Where ``scripts/fetch_test_vocab.py`` puts the files too large to commit."""
    env = os.environ.get("SAFECLIP_TEST_VOCAB_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "safeclip-edge" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-vocab"


def vocab_path(name: str) -> Path:
    """A vocabulary file, committed or fetched; skips the test (naming the fix) when it is absent."""
    for d in (COMMITTED, fetched_dir()):
        if (d / name).is_file():
            return d / name
    pytest.skip(f"{name} is not in tests/data/vocab nor in {fetched_dir()}: run `{FETCH_HINT}`")


@dataclass(frozen=True)
class Vocab:
    file: str                    # vocabulary file (gguf or SentencePiece model)
    tokenizer_class: str         # what the checkpoint's tokenizer_config.json names (as the vendor's does)
    vectors: str | None = None   # llama.cpp .inp/.out vectors (the HF tokenizer's ids, no specials)


VOCABS = {
    "llama2": Vocab("ggml-vocab-llama-spm.gguf", "LlamaTokenizer", "ggml-vocab-llama-spm.gguf"),
    "llama2-legacy": Vocab("ggml-vocab-llama-spm.gguf", "PreTrainedTokenizerFast", "ggml-vocab-llama-spm.gguf"),
    "mistral-v1": Vocab("mistral-tokenizer.model.v1", "LlamaTokenizer"),
    "mistral-v3": Vocab("mistral-tokenizer.model.v3", "LlamaTokenizer"),
    "llama3": Vocab("ggml-vocab-llama-bpe.gguf", "PreTrainedTokenizerFast", "ggml-vocab-llama-bpe.gguf"),
    "qwen2": Vocab("ggml-vocab-qwen2.gguf", "Qwen2Tokenizer", "ggml-vocab-qwen2.gguf"),
}


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: texts split by ``\\n__ggml_vocab_test__\\n``, one line of ids per text."""
    inp = vocab_path(name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = vocab_path(name + ".out").read_text(encoding="utf-8").split("\n")
    assert len(out) >= len(inp) > 10, f"{name}: {len(inp)} inputs, {len(out)} outputs"
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inp, out)]


def _legacy_llama(backend_json: dict) -> dict:
    """Meta's Llama-2 ``tokenizer.json`` pipeline on the same vocab and merges."""
    backend_json["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    backend_json["pre_tokenizer"] = None
    return backend_json


def _merges_by_score(model_file: Path, vocab: dict) -> list[list[str]]:
    """BPE merges ranked by SentencePiece piece score, so that BPE applies them as SentencePiece does.

    transformers 5 ranks the merges it derives from a ``tokenizer.model`` by piece *id*. Mistral's models
    keep whitespace-run pieces (``▁▁`` = 259, ``▁▁▁▁`` = 260, ...) at low ids with score -1e9, which
    SentencePiece merges last and the id ranking merges first: ``"a  b"`` becomes ``▁a ▁▁ b`` instead of
    SentencePiece's ``▁a ▁ ▁b``. Ranking by score gives SentencePiece's ids (``test_real_vocab`` checks).
    """
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    return [list(m) for m in generate_merges(vocab, scores)]


def _meta_llama3(backend_json: dict) -> dict:
    """Meta's Llama-3 ``tokenizer.json`` settings on the GGUF's vocab and merges (module docstring)."""
    backend_json["model"]["ignore_merges"] = True
    backend_json["added_tokens"] = [t for t in backend_json["added_tokens"] if t["content"] != "<|endoftext|>"]
    bos = next(t["id"] for t in backend_json["added_tokens"] if t["content"] == "<|begin_of_text|>")
    backend_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}}}
    return backend_json


SDIST_FILES = ("ggml-vocab-llama-bpe.gguf", "ggml-vocab-qwen2.gguf")   # + their .inp/.out


def fetch(dest: Path | None = None, quiet: bool = False) -> Path:
    """Extract the vocabularies too large to commit from llama-cpp-python's PyPI sdist into ``dest``
    (default :func:`fetched_dir`); does nothing when they are already there. Needs pip and PyPI."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    dest = Path(dest or fetched_dir())
    wanted = [f + ext for f in SDIST_FILES for ext in ("", ".inp", ".out")] + ["LICENSE"]
    if all((dest / f).is_file() for f in wanted):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        *(["-q"] if quiet else []), f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            for f in wanted:
                member = tar.getmember(root + ("" if f == "LICENSE" else "models/") + f)
                data = tar.extractfile(member).read()
                part = dest / f".{f}.part"
                part.write_bytes(data)
                os.replace(part, dest / f)                      # whole files only, never half of one
    return dest


def _file_sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _convert(name: str) -> dict:
    """Convert a vocabulary file with transformers (slow for big GGUF vocabularies: 10-30 s)."""
    import tempfile

    from transformers import AutoTokenizer, LlamaTokenizer

    v = VOCABS[name]
    path = vocab_path(v.file)
    if path.suffix == ".gguf":
        pytest.importorskip("gguf", reason="reading GGUF vocabularies needs the gguf package ([dev] extra)")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:                           # a SentencePiece model: transformers converts it with sentencepiece
        pytest.importorskip("sentencepiece", reason="converting SentencePiece models needs sentencepiece ([dev])")
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(path, Path(d) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(d, add_bos_token=True)   # Mistral's config adds BOS
    js = json.loads(tok.backend_tokenizer.to_str())
    if path.suffix != ".gguf":
        js["model"]["merges"] = _merges_by_score(path, js["model"]["vocab"])
    if name == "llama2-legacy":
        js = _legacy_llama(js)
    elif name == "llama3":
        js = _meta_llama3(js)
    specials = {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(tok, k, None) is not None}
    if name == "llama3":
        specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    return {"tokenizer": js, "specials": specials}


@functools.lru_cache(maxsize=None)
def converted_file(name: str) -> tuple[Path, dict]:
    """(``tokenizer.json`` of the vocabulary as :func:`_convert` makes it, its special tokens), cached on
    disk under :func:`fetched_dir` keyed by the source file's sha256 and the transformers version."""
    import tempfile

    import transformers

    src = vocab_path(VOCABS[name].file)
    import hashlib
    import inspect

    recipe = "".join(inspect.getsource(f) for f in (_convert, _legacy_llama, _meta_llama3, _merges_by_score))
    key = {"source": src.name, "sha256": _file_sha256(src), "transformers": transformers.__version__,
           "recipe": hashlib.sha256(recipe.encode()).hexdigest()[:16]}
    for d in (fetched_dir() / "converted", Path(tempfile.gettempdir()) / "safeclip-test-vocab"):
        tj, meta = d / f"{name}.tokenizer.json", d / f"{name}.provenance.json"
        try:
            if tj.is_file() and json.loads(meta.read_text())["key"] == key:
                return tj, json.loads(meta.read_text())["specials"]
        except (OSError, ValueError, KeyError):
            pass
    conv = _convert(name)
    for d in (fetched_dir() / "converted", Path(tempfile.gettempdir()) / "safeclip-test-vocab"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            tj, meta = d / f"{name}.tokenizer.json", d / f"{name}.provenance.json"
            (d / f".{name}.part").write_text(json.dumps(conv["tokenizer"], ensure_ascii=False), encoding="utf-8")
            os.replace(d / f".{name}.part", tj)
            meta.write_text(json.dumps({"key": key, "specials": conv["specials"]}, indent=1))
            return tj, conv["specials"]
        except OSError:
            continue
    raise OSError(f"cannot write the converted {name} tokenizer anywhere")


def convert_all() -> list[str]:
    """Convert (and cache) every vocabulary whose file is present; returns their names."""
    done = []
    for name, v in VOCABS.items():
        if any((d / v.file).is_file() for d in (COMMITTED, fetched_dir())):
            converted_file(name)
            done.append(name)
    return done


def backend_tokenizer(name: str):
    """A fresh ``tokenizers.Tokenizer`` of the vocabulary (the converted form, no LLaVA tokens added)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(converted_file(name)[0]))


def hf_tokenizer(name: str, *, llava_tokens: bool = False):
    """A fresh transformers tokenizer of the vocabulary; ``llava_tokens`` adds ``<image>`` and ``<pad>``
    (special, in that order, right after the vocabulary, as llava-hf does: 32000 and 32001 for Llama-2)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    path, specials = converted_file(name)
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if llava_tokens else {}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False, **specials, **extra)
    if llava_tokens:
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    return tok


def split_utf8_ids(tok, kind: str) -> list[int]:
    """Ids of single-byte tokens: SentencePiece ``<0xNN>`` byte fallback, or byte-level BPE's 256 symbols."""
    if kind == "spm":
        ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    else:
        from tokenizers.pre_tokenizers import ByteLevel
        ids = [tok.token_to_id(ch) for ch in ByteLevel.alphabet()]
    return sorted(i for i in ids if i is not None)


def byte_tokens(data: bytes, kind: str) -> list[str]:
    """The tokens that spell ``data`` one byte each: ``<0xNN>`` (SentencePiece byte fallback, ``kind="spm"``)
    or byte-level BPE's symbol of each byte (GPT-2's byte-to-unicode table, ``kind="bpe"``)."""
    if kind == "spm":
        return [f"<0x{b:02X}>" for b in data]
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    assert sorted(table.values()) == sorted(ByteLevel.alphabet())
    return [table[b] for b in data]


def pad_to(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def random_ids(rng: np.random.Generator, n: int, vocab: int, byte_ids: list[int], special_ids: list[int]) -> list[int]:
    """Token ids mixing whole tokens, single bytes (runs that split or break UTF-8) and special tokens."""
    out = []
    for u in rng.random(n):
        pool = byte_ids if u < 0.45 else special_ids if u < 0.52 else None
        out.append(int(rng.choice(pool)) if pool else int(rng.integers(0, vocab)))
    return out


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(name.encode()))


__all__ = ["VOCABS", "Vocab", "vocab_path", "fetched_dir", "fetch", "convert_all", "converted_file",
           "read_vectors", "hf_tokenizer", "backend_tokenizer",
           "split_utf8_ids", "byte_tokens", "pad_to", "random_ids", "rng_for", "LLAMA_CPP_PYTHON"]
