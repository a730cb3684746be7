"""Tiny demo LLaVA models with their exported decoders, built once per test session (shared by test files).

Cached per (num_kv_heads, dtype) in a temporary folder removed at exit: test_decoder.py and
test_generate.py use the same exports instead of paying for them twice.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="safeclip-lm-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@dataclass
class LM:
    llava_dir: Path
    model: object            # LlavaForConditionalGeneration (torch, fp32, eval)
    hf_tokenizer: object     # transformers tokenizer
    bundle: Path             # folder holding decoder.onnx(.data) and embed_tokens.npy
    frag: dict               # export_decoder's return value


@functools.lru_cache(maxsize=None)
def demo_model(num_kv_heads: int = 2):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from safeclip.export.demo import build_demo

    llava_dir, _ = build_demo(_ROOT / f"demo_kv{num_kv_heads}", num_kv_heads=num_kv_heads)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    return llava_dir, model, AutoTokenizer.from_pretrained(llava_dir)


@functools.lru_cache(maxsize=None)
def exported(num_kv_heads: int = 2, dtype: str = "float32", fused: bool = False) -> LM:
    """``fused``: the cpu target's graph of ONNX Runtime's fused operators (KV form "shared")."""
    from safeclip.export.decoder import export_decoder

    llava_dir, model, tok = demo_model(num_kv_heads)
    bundle = _ROOT / f"bundle_kv{num_kv_heads}_{dtype}{'_fused' if fused else ''}"
    frag = export_decoder(model, bundle, dtype=dtype, tokenizer=tok, ort_fusions=fused, fused=fused)
    return LM(llava_dir, model, tok, bundle, frag)


def prefill_feeds(text_config, seq: int = 5, seed: int = 0) -> dict:
    """ONNX Runtime feeds for an exported decoder's first call: ``seq`` random fp32 embeddings, an all-ones
    mask, positions 0..seq-1 and an empty past for every layer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cfg = text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    feeds = {"inputs_embeds": rng.standard_normal((1, seq, cfg.hidden_size)).astype(np.float32),
             "attention_mask": np.ones((1, seq), np.int64), "position_ids": np.arange(seq)[None]}
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32)
    return feeds
