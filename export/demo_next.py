"""A tiny random-weight LLaVA-NeXT ("anyres") plus a matching CLIP, built offline and deterministically.

Like :mod:`safeclip.export.demo` (same byte-level tokenizer helper, same CLIP construction), but a
``LlavaNextForConditionalGeneration``: a CLIP-shaped tower of 84 px with patch 14 (6x6 = 36 positions per
view), grid pinpoints that are the llava-v1.6 set scaled by 84/336 (2x1, 1x2, 2x2, 3x1, 1x3 tiles), a random
``image_newline``, and a Llama-shaped language model with grouped-query attention (as llava-v1.6-vicuna).
Saved with a ``LlavaNextImageProcessor`` config and a ``LlavaNextProcessor`` (patch size, select strategy,
one additional image token for the CLS), so transformers' own processor is the oracle in tests.

The chat template is llava-v1.6-vicuna's (``USER: <image>\\n... ASSISTANT:``), written out here; it also
takes plain-string contents. Its weights are random: text output and gate verdicts carry no meaning.
"""
from __future__ import annotations

from pathlib import Path

from .demo import (CLIP_MEAN, CLIP_STD, DEMO_SEED, LLAVA_CHAT_TEMPLATE, demo_clip, demo_configs, demo_tokenizers,
                   finish_demo_model)

IMAGE_SIZE, PATCH = 84, 14
GRID_PINPOINTS = [[84, 168], [168, 84], [168, 168], [252, 84], [84, 252]]

# llava-hf/llava-v1.6-vicuna-*-hf publish the llava-1.5 template (tests/data/chat_templates/README.md).
LLAVA_NEXT_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE


def build_demo_next(out_dir: str | Path, seed: int = DEMO_SEED + 1, num_kv_heads: int = 2) -> tuple[Path, Path]:
    """Write the tiny LLaVA-NeXT and its CLIP under ``out_dir``; returns (llava_next_dir, clip_dir)."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    out = Path(out_dir)
    next_dir, clip_dir = out / "llava_next", out / "clip"
    lm_tok, clip_tok = demo_tokenizers(LLAVA_NEXT_CHAT_TEMPLATE, 4096)
    image_token_id = lm_tok.convert_tokens_to_ids("<image>")

    torch.manual_seed(seed)
    vision_cfg, text_cfg = demo_configs(lm_tok, IMAGE_SIZE, 4096, num_kv_heads)
    cfg = LlavaNextConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token_id,
                          projector_hidden_act="gelu", vision_feature_select_strategy="default",
                          vision_feature_layer=-2, image_grid_pinpoints=GRID_PINPOINTS,
                          image_seq_length=(IMAGE_SIZE // PATCH) ** 2, pad_token_id=lm_tok.pad_token_id)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    finish_demo_model(model, lm_tok)
    clip = demo_clip(vision_cfg, clip_tok, model.model.vision_tower)

    sq = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    common = dict(do_resize=True, resample=3, do_center_crop=True, crop_size=sq, do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                  do_convert_rgb=True)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 image_grid_pinpoints=GRID_PINPOINTS, do_pad=True, **common)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=lm_tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_CHAT_TEMPLATE)
    model.save_pretrained(next_dir)
    processor.save_pretrained(next_dir)            # tokenizer, chat template, processor_config.json
    image_processor.save_pretrained(next_dir)      # preprocessor_config.json, as llava-hf checkpoints ship it
    clip.save_pretrained(clip_dir)
    clip_tok.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, **common).save_pretrained(clip_dir)
    return next_dir, clip_dir
