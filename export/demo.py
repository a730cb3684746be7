"""The built-in demo model: a tiny random-weight LLaVA plus a matching CLIP, built offline and deterministically.

The demo exists to run the whole pipeline anywhere (no model hub, no GPU). Its weights are random, so its
text output is meaningless and its gate verdicts carry no information about image content. The only
shaping: output-head rows of non-printable byte tokens are zeroed so the nonsense is at least readable.

What is built (llava-hf key layout, saved with ``save_pretrained`` and then loaded back through the same
code path as a real checkpoint):

* ``llava/``: ``LlavaForConditionalGeneration`` = CLIP-shaped vision tower (336 px, patch 14: 576 image
  positions, like LLaVA-1.5) + 2-layer GELU projector + Llama-shaped language model with grouped-query
  attention; a byte-level BPE tokenizer made in code with ``<image>`` as a special token; the LLaVA-1.5
  chat template; a CLIP image processor config.
* ``clip/``: ``CLIPModel`` whose vision tower *is* the LLaVA tower (same weights, as LLaVA-1.5's tower is
  CLIP ViT-L/14-336), with a text tower, ``visual_projection`` and its own byte-level tokenizer.
"""
from __future__ import annotations

from pathlib import Path

DEMO_SEED = 20250301
IMAGE_SIZE, PATCH = 336, 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The LLaVA-1.5 chat template exactly as llava-hf publishes it (llava-1.5-7b/13b-hf, llava-v1.6-vicuna-*-hf
# chat_template.json; source in tests/data/chat_templates/README.md): images of a turn first, then its texts,
# and transformers' own {% generation %} tag around assistant text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def byte_level_tokenizer(specials: list[str], bos: str | None = None):
    """A lossless byte-level BPE tokenizer (256 byte symbols + specials, no merges) made in code.

    ``specials`` get ids 0..k-1; the 256 byte symbols follow. With ``bos``, every encoding starts with it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return tok


def demo_tokenizers(chat_template: str, model_max_length: int):
    """(language-model tokenizer with ``<image>``, CLIP tokenizer), both byte-level, made in code."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    lm_tok = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>"),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=model_max_length)
    lm_tok.chat_template = chat_template
    clip_tok = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(["<|startoftext|>", "<|endoftext|>"], bos="<|startoftext|>"),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=77)
    # CLIP's text pooling takes the first <|endoftext|>: append it as the reference tokenizer does.
    clip_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return lm_tok, clip_tok


def demo_configs(lm_tok, image_size: int, context: int, num_kv_heads: int):
    """(CLIP vision config, Llama text config) of the tiny demo shapes."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision_cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, image_size=image_size, patch_size=PATCH,
                                  projection_dim=32, hidden_act="quick_gelu")
    text_cfg = LlamaConfig(vocab_size=len(lm_tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=context,
                           rms_norm_eps=1e-5, bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id,
                           pad_token_id=lm_tok.pad_token_id, tie_word_embeddings=False)
    return vision_cfg, text_cfg


def finish_demo_model(model, lm_tok) -> None:
    """Generation ids, and a readable-nonsense output head.

    The output-head rows of printable-ASCII tokens are scaled up and all others zeroed, so generated text is
    letters and punctuation rather than stray UTF-8 bytes (replacement characters). The weights stay random;
    the text stays meaningless. EOS keeps a small random row: answers rarely end before max_new_tokens.
    """
    import torch

    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(lm_tok, key))
    with torch.no_grad():
        for tid in range(len(lm_tok)):
            piece = lm_tok.decode([tid])
            if len(piece) == 1 and 32 <= ord(piece) < 127:
                model.lm_head.weight[tid].mul_(30.0)
            elif tid != lm_tok.eos_token_id:
                model.lm_head.weight[tid].zero_()


def demo_clip(vision_cfg, clip_tok, tower):
    """A CLIPModel whose vision tower *is* ``tower`` (LLaVA's towers are CLIP towers), with a small text
    tower and a trained CLIP's temperature (logit scale 100)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    clip_cfg = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                   projection_dim=32, bos_token_id=clip_tok.bos_token_id,
                                   eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id).to_dict(),
        vision_config=vision_cfg.to_dict(), projection_dim=32)
    clip = CLIPModel(clip_cfg).eval()
    clip.vision_model.load_state_dict(tower.state_dict())
    with torch.no_grad():
        clip.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    return clip


def build_demo(out_dir: str | Path, seed: int = DEMO_SEED, num_kv_heads: int = 2) -> tuple[Path, Path]:
    """Write the demo LLaVA and CLIP checkpoints under ``out_dir``; returns (llava_dir, clip_dir)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    llava_dir, clip_dir = out / "llava", out / "clip"
    lm_tok, clip_tok = demo_tokenizers(LLAVA_CHAT_TEMPLATE, 2048)
    image_token_id = lm_tok.convert_tokens_to_ids("<image>")

    torch.manual_seed(seed)
    vision_cfg, text_cfg = demo_configs(lm_tok, IMAGE_SIZE, 2048, num_kv_heads)
    llava_cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token_id,
                            projector_hidden_act="gelu", vision_feature_select_strategy="default",
                            vision_feature_layer=-2, image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
                            pad_token_id=lm_tok.pad_token_id)
    llava = LlavaForConditionalGeneration(llava_cfg).eval()
    finish_demo_model(llava, lm_tok)
    clip = demo_clip(vision_cfg, clip_tok, llava.model.vision_tower)

    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                   do_resize=True, do_center_crop=True, resample=3, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN,
                                   image_std=CLIP_STD, do_convert_rgb=True)
    llava.save_pretrained(llava_dir)
    lm_tok.save_pretrained(llava_dir)
    processor.save_pretrained(llava_dir)
    clip.save_pretrained(clip_dir)
    clip_tok.save_pretrained(clip_dir)
    processor.save_pretrained(clip_dir)
    return llava_dir, clip_dir
