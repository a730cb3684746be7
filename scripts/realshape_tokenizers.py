"""Tokenizers for ``scripts/realshape.py``: the LLaVA-1.5 (Llama-2) tokenizer and a CLIP-style one.

* :func:`llava_tokenizer`: the real Llama-2 vocabulary where ``tests/data/vocab`` holds llama.cpp's
  ``ggml-vocab-llama-spm.gguf`` and the ``gguf`` package is installed (:func:`tokenizer_source` says which),
  else :func:`llama_like_tokenizer`; either way 32000 entries + ``<image>`` 32000 + ``<pad>`` 32001, as
  llava-hf ships it.
* :func:`llama_like_tokenizer`: a Llama-style ``tokenizers`` BPE made in code (``<unk> <s> </s>``, 256 byte
  fallback tokens, ``▁`` word marks, merges of pseudo-words with English letter frequencies).
* :func:`clip_like_tokenizer`: CLIP's pipeline (lower-casing, its split regex, byte-level symbols, ``</w>``
  word ends, ``<|startoftext|>`` 49406 / ``<|endoftext|>`` 49407) over 49408 entries made in code.

No real CLIP vocabulary is stored in this repository; the exporter only needs the descriptor sentences to
tokenize into valid ids of the right vocabulary size, with CLIP's start/end tokens.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

LLAMA_TOKENS, IMAGE_ID, PAD_ID = 32000, 32000, 32001
CLIP_VOCAB = 49408
_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
LLAMA2_GGUF = _DATA / "vocab" / "ggml-vocab-llama-spm.gguf"          # llama.cpp's Llama-2 vocabulary
CHAT_TEMPLATE_JSON = _DATA / "chat_templates" / "llava-1.5-7b-hf.chat_template.json"


_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTER_W = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
             1.0, 0.8, 0.2, 0.2, 0.1, 0.1]


def _pseudo_words(seed: int):
    """Endless deterministic pseudo-words (English letter frequencies, 2..10 letters, some capitalised)."""
    rng = random.Random(seed)
    while True:
        w = "".join(rng.choices(_LETTERS, _LETTER_W, k=rng.randint(2, 10)))
        yield w.capitalize() if rng.random() < 0.1 else w


def _chain(vocab: dict, merges: list, pieces: list[str], size: int) -> None:
    """Add ``a+b`` merges building each piece left to right from its first symbol, until ``size`` entries."""
    cur = pieces[0]
    for p in pieces[1:]:
        if len(vocab) >= size:
            return
        if cur + p not in vocab:
            vocab[cur + p] = len(vocab)
            merges.append((cur, p))
        cur += p


def llama_like_tokenizer(seed: int = 0):
    """A Llama-style ``tokenizers`` BPE of 32000 entries (+ ``<image>`` 32000, ``<pad>`` 32001), made in code:
    ``<unk> <s> </s>``, 256 byte-fallback tokens, characters, then merges of ``▁``-marked pseudo-words."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in "▁" + _LETTERS + _LETTERS.upper() + "0123456789.,!?;:'\"-()[]/&%$#@*+=<>_":
        vocab.setdefault(ch, len(vocab))
    merges: list = []
    for w in _pseudo_words(seed):
        if len(vocab) >= LLAMA_TOKENS:
            break
        _chain(vocab, merges, (["▁"] if w[0].islower() else []) + list(w), LLAMA_TOKENS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    return tok


def tokenizer_source() -> str:
    """``llama-2``: the real Llama-2 vocabulary (``tests/data/vocab``, read with the ``gguf`` package) where
    both are present; else ``synthetic`` (:func:`llama_like_tokenizer`)."""
    import importlib.util

    return "llama-2" if LLAMA2_GGUF.is_file() and importlib.util.find_spec("gguf") else "synthetic"


@functools.lru_cache(maxsize=2)
def llava_tokenizer(seed: int = 0):
    """The language model's tokenizer as llava-hf ships it: 32000 entries, ``<image>`` 32000, ``<pad>`` 32001."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left", model_max_length=4096,
              extra_special_tokens={"image_token": "<image>"})
    if tokenizer_source() == "synthetic":
        return PreTrainedTokenizerFast(tokenizer_object=llama_like_tokenizer(seed), pad_token="<pad>", **kw)
    real = AutoTokenizer.from_pretrained(LLAMA2_GGUF.parent, gguf_file=LLAMA2_GGUF.name)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(real.backend_tokenizer.to_str()), **kw)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    if tok.convert_tokens_to_ids(["<image>", "<pad>"]) != [IMAGE_ID, PAD_ID]:
        raise ValueError(f"{LLAMA2_GGUF.name}: <image>/<pad> did not land at {IMAGE_ID}/{PAD_ID}")
    return tok


def chat_template() -> str:
    """llava-hf/llava-1.5-7b-hf's published template where ``tests/data`` has it, else the demo's copy."""
    if CHAT_TEMPLATE_JSON.is_file():
        return json.loads(CHAT_TEMPLATE_JSON.read_text())["chat_template"]
    from safeclip.export.demo import LLAVA_CHAT_TEMPLATE
    return LLAVA_CHAT_TEMPLATE


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def clip_like_tokenizer(seed: int = 1):
    """A CLIP-style byte-level BPE of 49408 entries made in code: 256 byte symbols, the same with ``</w>``,
    pseudo-word merges, then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407 (lower-cased input)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges: list = []
    for w in _pseudo_words(seed):
        if len(vocab) >= CLIP_VOCAB - 2:
            break
        w = w.lower()
        _chain(vocab, merges, list(w[:-1]) + [w[-1] + "</w>"], CLIP_VOCAB - 2)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>", continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|startoftext|>", special=True, normalized=True),
                            AddedToken("<|endoftext|>", special=True, normalized=True)])
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", CLIP_VOCAB - 1),
                                                      ("<|startoftext|>", CLIP_VOCAB - 2),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok
