"""Descriptor text embeddings: each sentence through the CLIP text tower, then ``text_projection``.

The embeddings are computed once at export time and baked into the vision+gate graph as a constant.
"""
from __future__ import annotations

from pathlib import Path

from safeclip.descriptors import DescriptorSet


def text_embeddings(clip_model, clip_path: Path, dset: DescriptorSet):
    """[S, E] L2-normalised float32 embeddings of ``dset.flat_sentences`` (in that order)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(clip_path)
    batch = tok(dset.flat_sentences, padding=True, truncation=True,
                max_length=clip_model.config.text_config.max_position_embeddings, return_tensors="pt")
    with torch.no_grad():
        out = clip_model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    emb = out.pooler_output if hasattr(out, "pooler_output") else out     # transformers 5.x returns an output object
    return (emb / emb.norm(dim=-1, keepdim=True)).float()


def logit_scale_of(clip_model) -> float:
    """CLIP's temperature exp(logit_scale), clamped at 100 as CLIP training does (the reference uses 100)."""
    import math
    return float(min(math.exp(float(clip_model.logit_scale.detach())), 100.0))
