"""Tiny random LLaVA checkpoints on real tokenizer vocabularies (see ``_vocab.py``), laid out as llava-hf does.

A checkpoint folder holds ``LlavaForConditionalGeneration`` (CLIP-shaped vision tower, 56 px / patch 14 = 16
image positions; a 2-layer Llama- or Mistral-shaped language model, hidden size 64), the real tokenizer with
``<image>`` and ``<pad>`` added right after the vocabulary (Llama-2: 32000 and 32001), the vocabulary padded
to a multiple of 64 in the model (Llama-2: 32064), a ``LlavaProcessor`` (processor, image processor and
tokenizer configs) and a chat template. ``tokenizer_config.json`` names the class the vendor's does
(``LlamaTokenizer`` for Llama-2 and Mistral, so transformers 5 loads it the way it loads llava-hf's).

The weights are random, so greedy decoding emits random tokens; :func:`plant_chain` additionally makes the
model a controlled bigram machine on a few tokens: after the prompt's last token it emits a chosen token
sequence (byte-fallback / single-byte tokens spelling multi-byte characters, a special token between
two bytes of one character, an invalid byte run), then random tokens again. The other weights stay random
and transformers' ``generate`` stays the oracle; the chain only makes sure those cases occur.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _vocab import VOCABS, byte_tokens, hf_tokenizer, pad_to

IMAGE_SIZE, PATCH = 56, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2          # 16 positions per image
REPO_DATA = Path(__file__).resolve().parent / "data"


def published_template(file: str) -> str:
    """A chat template as llava-hf publishes it (``tests/data/chat_templates``)."""
    return json.loads((REPO_DATA / "chat_templates" / file).read_text(encoding="utf-8"))["chat_template"]


@dataclass(frozen=True)
class Case:
    """One end-to-end case: a vocabulary, its pairing template and text architecture, and a planted chain."""
    vocab: str
    template: str
    text_arch: str            # "llama" | "mistral"
    kind: str                 # "spm" (byte fallback) | "bpe" (byte-level)
    special: str              # a special token the chain puts between two bytes of one character


def chain_tokens(tok, case: Case) -> list[str]:
    """Token strings of the planted chain (all distinct): leading-space words, '€' and '🦙' one byte per
    token (a special token inside '€'), a newline byte, an invalid two-byte run ('V' + lone 0x92)."""
    sp = "▁" if case.kind == "spm" else "Ġ"
    euro, llama, nl, bad = (byte_tokens(b, case.kind) for b in ("€".encode(), "🦙".encode(), b"\n", b"V\x92"))
    chain = [f"{sp}Hello", ",", sp, euro[0], case.special, *euro[1:], f"{sp}world", *nl, f"{sp}and", *llama, ".",
             *bad, "!"]
    assert len(set(chain)) == len(chain), chain
    return chain


def plant_chain(model, start: int, chain: list[int], seed: int = 0, beta: float = 50.0, alpha: float = 4.0) -> None:
    """After token ``start``, greedy decoding emits ``chain`` (then random tokens again).

    Each key token (``start`` and every chain token but the last) gets an embedding row ``beta * v_i`` with
    orthonormal ``v_i``; the residual stream at that position is then almost ``beta * v_i`` (the random
    layers add O(1)), RMSNorm maps it to ~``8 v_i`` and the LM-head row ``alpha * v_i`` of the next token wins
    by a wide margin (cosine ~1 against at most ~0.6 for the best of 150k random rows of the same length, which
    the head is scaled to). The last chain token keeps its random embedding, so generation goes back to random.
    """
    import torch

    keys, values = [start, *chain[:-1]], chain
    assert len(set(keys)) == len(keys), "a key token would need two successors"
    d = model.config.text_config.hidden_size
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, len(keys))))       # [D, K] orthonormal
    v = torch.from_numpy(q.T.copy()).float()                                           # [K, D]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        head = model.lm_head.weight
        head.mul_(alpha / head.norm(dim=1).mean())       # every row about as long as a chain row: random
        for i, (k, nxt) in enumerate(zip(keys, values)):
            emb[k] = beta * v[i]
            head[nxt] = alpha * v[i]


def build(case: Case, out: Path, seed: int = 0) -> dict:
    """Write the checkpoint into ``out``; returns facts the tests need (ids, chain, start token)."""
    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, MistralConfig)

    from safeclip.export.demo import CLIP_MEAN, CLIP_STD

    out = Path(out)
    tok = hf_tokenizer(case.vocab, llava_tokens=True)
    image_id, pad_id = tok.convert_tokens_to_ids(["<image>", "<pad>"])
    assert (image_id, pad_id) == (tok.vocab_size, tok.vocab_size + 1) == (len(tok) - 2, len(tok) - 1)
    image_proc = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                    do_resize=True, do_center_crop=True, resample=3, do_rescale=True,
                                    rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN,
                                    image_std=CLIP_STD, do_convert_rgb=True)
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=PATCH, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=case.template)
    proc.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = VOCABS[case.vocab].tokenizer_class
    tcfg["chat_template"] = case.template                  # llava-hf ships it with the tokenizer too
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
    tok = AutoTokenizer.from_pretrained(out)                # as transformers loads the checkpoint

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32, hidden_act="quick_gelu")
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[case.text_arch]
    extra = {"sliding_window": None} if case.text_arch == "mistral" else {}
    text = text_cls(vocab_size=pad_to(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad_id,
                    tie_word_embeddings=False, **extra)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      image_seq_length=IMAGE_TOKENS, pad_token_id=pad_id)
    model = LlavaForConditionalGeneration(cfg).eval()
    for key, value in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id), ("pad_token_id", pad_id)):
        setattr(model.generation_config, key, value)

    # the prompt's last token (the template's generation prompt ends every prompt the same way)
    sample = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                      add_generation_prompt=True, tokenize=False)
    start = tok(sample, add_special_tokens=False).input_ids[-1]
    chain = tok.convert_tokens_to_ids(chain_tokens(tok, case))
    assert tok.unk_token_id not in chain and None not in chain, chain
    plant_chain(model, start, chain, seed)
    model.save_pretrained(out)
    return {"image_token_id": image_id, "pad_token_id": pad_id, "start": start, "chain": chain,
            "vocab_size": text.vocab_size, "tokens": len(tok)}


def build_clip(out: Path, seed: int = 1) -> Path:
    """A CLIP checkpoint for the gate whose projection fits the tiny tower (its own tower is never used)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from safeclip.export.demo import LLAVA_CHAT_TEMPLATE, demo_clip, demo_tokenizers

    torch.manual_seed(seed)
    _, clip_tok = demo_tokenizers(LLAVA_CHAT_TEMPLATE, 512)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32, hidden_act="quick_gelu")
    clip = demo_clip(vision, clip_tok, CLIPVisionModel(vision))
    clip.save_pretrained(out)
    clip_tok.save_pretrained(out)
    return Path(out)
