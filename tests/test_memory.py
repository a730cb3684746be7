"""Memory table for --dry-run (safeclip.export.memory): arithmetic checked by hand and against transformers.

Oracles: hand-derived counts for the demo config and llava-1.5-7b (derivations in the comments; the 7B total
without the gate head, 7,063,427,072, is the parameter count of llava-hf/llava-1.5-7b-hf), the demo model's
own torch parameters, and every table model instantiated on PyTorch's meta device.
"""
from __future__ import annotations

import json

import pytest

from safeclip.export.memory import (GiB, MODELS, ORIN_MODULES, UnsupportedPrecision, dry_run_table, estimate,
                                    family_table, longest_context, param_counts, usable_bytes)


@pytest.fixture(scope="module")
def demo_cfg(demo_sources):
    return demo_sources.llava.config.to_dict()


# Demo: vision H=64, I=128, 3 layers, 336/14 -> 576 patches; LM V=261, H=64, I=160, 2 layers, 4 heads, 2 KV heads.
#   vision: embeddings 3*14*14*64 + 64 + 577*64 = 74,624; pre/post LayerNorm 2*128; per layer
#           4*(64*64+64) + 2*128 + (64*128+128) + (128*64+64) = 33,472, x3 = 100,416  -> 175,296
#   gate head: projection 32 x 64 = 2,048;   projector: (64*64+64) * 2 = 8,320
#   LM: embed 261*64 = 16,704; per layer q 4,096 + k 2,048 + v 2,048 + o 4,096 + mlp 3*64*160 = 30,720
#       + norms 128 = 43,136, x2 = 86,272; final norm 64; lm_head 16,704  -> 119,744
DEMO = {"vision_tower": 175_296, "gate_head": 2_048, "projector": 8_320, "language_model": 119_744}

# llava-1.5-7b: vision embeddings 3*196*1024 + 1024 + 577*1024 = 1,193,984; layer 4*(1024^2+1024) + 4*1024
#   + (1024*4096+4096) + (4096*1024+1024) = 12,596,224, x24 = 302,309,376; + 2*2048 LN -> 303,507,456
#   projector 1024*4096+4096 + 4096*4096+4096 = 20,979,712; gate head 768*1024 = 786,432
#   LM: 32064*4096 = 131,334,144 (x2: embed, lm_head); layer 4*4096^2 + 3*4096*11008 + 2*4096 = 202,383,360,
#   x32 = 6,476,267,520; + 4,096 -> 6,738,939,904
LLAVA_7B = {"vision_tower": 303_507_456, "gate_head": 786_432, "projector": 20_979_712, "language_model": 6_738_939_904}


def test_demo_counts_by_hand_and_by_torch(demo_cfg, demo_sources):
    assert param_counts(demo_cfg) == DEMO
    m = demo_sources.llava.model
    numel = lambda mod: sum(p.numel() for p in mod.parameters())      # noqa: E731
    assert numel(m.vision_tower) == DEMO["vision_tower"]
    assert numel(m.multi_modal_projector) == DEMO["projector"]
    assert numel(m.language_model) + numel(demo_sources.llava.lm_head) == DEMO["language_model"]
    assert demo_sources.clip.visual_projection.weight.numel() == DEMO["gate_head"]


def test_demo_bytes_and_kv(demo_cfg):
    total = sum(DEMO.values())                                          # 305,408 parameters
    e32, e16 = estimate(demo_cfg, 2048, "fp32"), estimate(demo_cfg, 2048, "fp16")
    assert e32.weight_bytes == 4 * total == 1_221_632 and e16.weight_bytes == 2 * total
    # KV: 2 (k, v) x 2 layers x 2 KV heads x 16 head_dim x 2048 tokens x 2 B, one arena
    assert e16.kv_bytes == 2 * 2 * 2 * 16 * 2048 * 2 == 524_288 and e32.kv_bytes == 2 * e16.kv_bytes
    assert estimate(demo_cfg, 1, "fp16").kv_bytes == 524_288 // 2048
    # vision activations, 1 view: 577 tokens x (4*64 + 128) + 4 heads x 577^2, x 2 B
    assert e16.views == 1 and e16.vision_act_bytes == 2 * (577 * (4 * 64 + 128) + 4 * 577 * 577)
    assert e16.total_bytes == e16.weight_bytes + e16.kv_bytes + e16.vision_act_bytes + e16.decoder_act_bytes


def test_llava_1_5_7b_by_hand():
    assert param_counts(MODELS["llava-1.5-7b"]) == LLAVA_7B
    assert sum(LLAVA_7B.values()) - LLAVA_7B["gate_head"] == 7_063_427_072     # llava-hf/llava-1.5-7b-hf
    e = estimate("llava-1.5-7b", 4096, "fp16")
    assert e.weight_bytes == 2 * sum(LLAVA_7B.values())
    assert e.kv_bytes == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * GiB
    assert estimate("llava-v1.6-mistral-7b", 4096).kv_bytes == GiB // 2   # 8 KV heads: a quarter
    assert estimate("llava-v1.6-mistral-7b", 4096).views == 5           # base + 2x2 tiles (672x672 pinpoint)


@pytest.mark.parametrize("name", list(MODELS))
def test_table_models_match_transformers_on_the_meta_device(name):
    torch = pytest.importorskip("torch")
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)
    cfg = MODELS[name]
    next_ = "image_grid_pinpoints" in cfg
    text = LlamaConfig(**cfg["text_config"])            # Mistral / Yi have Llama's parameter layout
    vision = CLIPVisionConfig(**cfg["vision_config"])
    kw = dict(text_config=text, vision_config=vision, vision_feature_layer=cfg["vision_feature_layer"])
    with torch.device("meta"):
        model = (LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=cfg["image_grid_pinpoints"], **kw))
                 if next_ else LlavaForConditionalGeneration(LlavaConfig(**kw)))
    numel = lambda mod: sum(p.numel() for p in mod.parameters())      # noqa: E731
    counts = param_counts(cfg)
    assert numel(model.model.vision_tower) == counts["vision_tower"]
    assert numel(model.model.multi_modal_projector) + (model.model.image_newline.numel() if next_ else 0) \
        == counts["projector"]
    assert numel(model.model.language_model) + numel(model.lm_head) == counts["language_model"]
    assert numel(model) == sum(counts.values()) - counts["gate_head"]


def test_fits_per_module():
    e = estimate("llava-1.5-7b", 4096, "fp16")                          # 13.16 GiB weights + 2 GiB KV + ...
    assert usable_bytes("AGX Orin 32GB") == 30 * GiB and usable_bytes("Orin Nano 4GB") == 2 * GiB
    table = dry_run_table("llava-1.5-7b", 4096, "fp16")
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
             if line.startswith("| ") and line.split("|")[1].strip() in ORIN_MODULES and line.count("|") == 9}
    rows = {m: c[2] for m, c in cells.items()}                           # usable, fp16 GiB, fp16 fits, int8 ...
    want = {m: "yes" if e.total_bytes <= usable_bytes(m) else "no" for m in ORIN_MODULES}
    assert rows == want and rows["AGX Orin 32GB"] == "yes" and rows["Orin NX 16GB"] == "no"
    for i, w in ((4, "int8"), (6, "int4")):                              # the int8 / int4 columns
        q = estimate("llava-1.5-7b", 4096, "fp16", w)
        assert {m: c[i] for m, c in cells.items()} == {m: "yes" if q.total_bytes <= usable_bytes(m) else "no"
                                                       for m in ORIN_MODULES}
    assert cells["Orin NX 16GB"][6] == "yes" and cells["Orin NX 8GB"][6] == "no"
    assert f"| **total** | | **{e.total_bytes / GiB:.2f}** |" in table
    assert "2 x 32 layers x 32 KV heads x 128 x 4096 tokens x 2 B, one arena" in table
    fam = family_table(4096, "fp16")
    assert all(name in fam for name in MODELS) and fam.count("| llava-v1.6-34b |") == 1
    line = next(ln for ln in fam.splitlines() if ln.startswith("| llava-v1.6-34b |"))
    mods = [c.strip() for c in line.split("|")[5:-1]]                    # after name and 3 GiB columns
    assert len(mods) == len(ORIN_MODULES) and not any("fp16" in c for c in mods)   # 34B fp16 fits no module
    assert "int4" in mods[list(ORIN_MODULES).index("AGX Orin 64GB")]


def test_int8_int4_weights_by_hand():
    # llava-1.5-7b linear layers: 32 x (4 x 4096^2 + 3 x 4096 x 11008) = 6,476,005,376 weights; output channels
    #   32 x (3 x 4096 + 4096 + 2 x 11008 + 4096) = 1,359,872. fp16 weights: 2 x 7,064,213,504 B.
    lin, outs, fp16 = 6_476_005_376, 1_359_872, 2 * 7_064_213_504
    e4, e8 = estimate("llava-1.5-7b", 4096, "fp16", "int4"), estimate("llava-1.5-7b", 4096, "int8")
    assert e4.weight_bytes == fp16 - 2 * lin + lin // 2 + lin // 128 * 2          # int4 + an fp16 scale per 128
    assert e8.weight_bytes == fp16 - 2 * lin + lin + 2 * outs                     # int8 + an fp16 scale per channel
    assert e4.kv_bytes == estimate("llava-1.5-7b", 4096).kv_bytes and e4.weights == "int4"
    assert longest_context("llava-1.5-7b", "Orin NX 8GB", "fp16", "int4") > 0
    assert longest_context("llava-1.5-7b", "Orin NX 8GB", "fp16") == 0
    e = estimate("llava-1.5-7b", longest_context("llava-1.5-7b", "Orin NX 8GB", "fp16", "int4"), "fp16", "int4")
    assert e.total_bytes <= usable_bytes("Orin NX 8GB") < estimate("llava-1.5-7b", e.context + 1, "int4").total_bytes


def test_precision_context_and_input_errors(tmp_path, demo_cfg):
    for p in ("fp8", "nf4"):
        with pytest.raises(UnsupportedPrecision, match=f"{p} weights are not supported by this exporter"):
            dry_run_table("llava-1.5-7b", 4096, p)
    with pytest.raises(ValueError, match="unknown precision 'bf17'"):
        estimate("llava-1.5-7b", 4096, "bf17")
    with pytest.raises(ValueError, match="context 8192 outside 1..4096"):
        estimate("llava-1.5-7b", 8192)
    with pytest.raises(ValueError, match="neither a known model"):
        estimate("llava-99b", 1024)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(demo_cfg))
    assert estimate(tmp_path / "m", 2048, "fp32").weight_bytes == estimate(demo_cfg, 2048, "fp32").weight_bytes
    assert dry_run_table(tmp_path / "m", 2048, "fp16").startswith("### m: fp16 weights, 2048 tokens")


def test_dry_run_takes_a_hub_id_offline_and_prints_the_export_needs(capsys):
    """`--dry-run --model llava-hf/llava-1.5-7b-hf` needs no download: the table knows the model; it also
    says what the export itself needs (the streaming exporter's disk and peak memory)."""
    from safeclip.export.cli import main
    from safeclip.export.memory import EXPORT_BASE_GIB, export_needs

    assert main(["--dry-run", "--model", "llava-hf/llava-1.5-7b-hf", "--target", "jetson"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### llava-1.5-7b: fp16 weights, 4096 tokens")
    e = estimate("llava-1.5-7b", 4096, "fp16")
    t = MODELS["llava-1.5-7b"]["text_config"]
    disk, peak = export_needs(e, t)
    # by hand: the decoder's weights (language model less the 32064 x 4096 embedding table) in fp16, two
    # fp32 copies of the largest matrix (the LM head), and the exporter's own memory
    decoder = (e.params["language_model"] - 32064 * 4096) * 2
    assert peak == int(EXPORT_BASE_GIB * GiB) + decoder + 2 * 32064 * 4096 * 4
    assert disk == e.weight_bytes
    assert f"about {disk / GiB:.2f} GiB of disk" in out and f"peak of about {peak / GiB:.2f} GiB" in out
