"""``scripts/realshape.py`` writes checkpoints that transformers loads as the published ones, at the tiny shape.

Oracles: ``LlavaForConditionalGeneration.from_pretrained`` / ``CLIPModel.from_pretrained`` report no missing,
unexpected or mismatched keys and every loaded tensor equals the one in the file (so nothing was random-
initialised by the loader and the name mapping is the right one); ``safetensors.safe_open`` reads every
shard; ``LlavaProcessor`` expands ``<image>`` to the model's 576 positions.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import realshape  # noqa: E402

SHARD = 1_500_000          # bytes: the tiny checkpoint (~11 MB) gets several shards; embed_tokens (4 MB) its own


def _file_tensors(folder: Path) -> dict[str, tuple[str, "torch.Tensor"]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = (f.name, st.get_tensor(k))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{(layout, dtype): folder} of the tiny LLaVA, written once per module."""
    root = tmp_path_factory.mktemp("realshape")
    return {(layout, dtype): (root / f"{layout}-{dtype}", realshape.write_llava_checkpoint(
        root / f"{layout}-{dtype}", "tiny", dtype, layout, SHARD, seed=3))
        for layout in realshape.LAYOUTS for dtype in realshape.DTYPES}


@pytest.mark.parametrize("layout", realshape.LAYOUTS)
@pytest.mark.parametrize("dtype", list(realshape.DTYPES))
def test_checkpoint_loads_with_every_tensor_from_the_files(written, layout, dtype):
    from transformers import LlavaForConditionalGeneration

    folder, stamp = written[(layout, dtype)]
    files = _file_tensors(folder)
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == getattr(torch, dtype)
    state = model.state_dict()
    to_file = (lambda k: k) if layout == "transformers5" else realshape.legacy_name
    assert {to_file(k) for k in state} == set(files)
    for k, v in state.items():
        assert torch.equal(v, files[to_file(k)][1]), k
    if layout == "legacy":
        assert {k.split(".")[0] for k in files} == {"language_model", "vision_tower", "multi_modal_projector"}
        assert all(k.startswith("vision_tower.vision_model.") for k in files if k.startswith("vision_tower"))
        assert "language_model.lm_head.weight" in files
    else:
        assert {k.split(".")[0] for k in files} == {"model", "lm_head"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == cfg["text_config"]["torch_dtype"] == dtype
    assert (cfg["image_token_index"], cfg["image_seq_length"], cfg["vision_feature_layer"]) == (32000, 576, -2)
    assert cfg["text_config"]["vocab_size"] == 32064 and cfg["vision_feature_select_strategy"] == "default"
    assert stamp["tensors"] == len(files)


def test_index_names_every_tensor_and_shards_respect_the_limit(written):
    folder, stamp = written[("legacy", "float16")]
    files = _file_tensors(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    n = len(stamp["shards"])
    assert n > 2 and stamp["shards"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["weight_map"] == {k: shard for k, (shard, _) in files.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in files.values())
    for shard in stamp["shards"]:
        sizes = [t.numel() * t.element_size() for s, t in files.values() if s == shard]
        assert sum(sizes) <= SHARD or len(sizes) == 1, (shard, sum(sizes))
    assert (folder / stamp["shards"][0]).stat().st_size <= SHARD + 64 * 1024     # + the JSON header


def test_values_are_realistic_and_depend_only_on_seed_and_name(written):
    a = _file_tensors(written[("legacy", "float16")][0])
    b = _file_tensors(written[("transformers5", "float16")][0])
    w = a["language_model.model.layers.0.mlp.up_proj.weight"][1].float()
    assert abs(w.std().item() - realshape.STD) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert torch.equal(a["language_model.model.norm.weight"][1], torch.ones(64, dtype=torch.float16))
    assert not a["vision_tower.vision_model.pre_layrnorm.bias"][1].any()
    assert torch.equal(w.half(), b["model.language_model.layers.0.mlp.up_proj.weight"][1])
    bf = _file_tensors(written[("legacy", "bfloat16")][0])["language_model.model.layers.0.mlp.up_proj.weight"][1]
    assert bf.dtype == torch.bfloat16 and (bf.float() - w).abs().max().item() < 1e-3


def test_tokenizer_processor_and_template_as_llava_hf(written):
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    folder = written[("legacy", "float16")][0]
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 32002 and tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 32001)
    ids = tok("A cat on a mat").input_ids
    assert ids[0] == 1 and all(3 <= i < 32000 for i in ids[1:])
    assert tok.decode(ids, skip_special_tokens=True) == "A cat on a mat"
    proc = AutoProcessor.from_pretrained(folder)
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
    prompt = proc.apply_chat_template([turn], add_generation_prompt=True)
    assert prompt == "USER: <image>\nHi ASSISTANT:"
    batch = proc(images=Image.new("RGB", (500, 400), (120, 30, 200)), text=prompt, return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((batch["input_ids"] == 32000).sum()) == 576


def test_clip_checkpoint_loads_and_tokenizes_descriptor_sentences(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from safeclip.descriptors import load_descriptor_set

    stamp = realshape.write_clip_checkpoint(tmp_path / "clip", "tiny")
    assert stamp["shards"] == ["model.safetensors"]
    files = _file_tensors(tmp_path / "clip")
    clip, info = CLIPModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(torch.equal(v, files[k][1]) for k, v in clip.state_dict().items())
    assert clip.dtype == torch.float16 and math.isclose(clip.logit_scale.item(), math.log(100), rel_tol=1e-3)
    tok = AutoTokenizer.from_pretrained(tmp_path / "clip")
    assert len(tok) == 49408
    sentences = load_descriptor_set("default").flat_sentences
    batch = tok(sentences, padding=True, truncation=True, max_length=77, return_tensors="pt")
    ids = batch["input_ids"]
    assert (ids[:, 0] == 49406).all() and (ids.argmax(-1) == (ids == 49407).int().argmax(-1)).all()
    with torch.no_grad():
        emb = clip.float().get_text_features(**batch)
    emb = getattr(emb, "pooler_output", emb)
    assert tuple(emb.shape) == (len(sentences), 32) and torch.isfinite(emb).all()


def test_real_shapes_have_the_published_parameter_counts():
    """From the meta-device models (no weights): the published totals of the parts."""
    vit_l_336 = 303_507_456                     # CLIPVisionModel of openai/clip-vit-large-patch14-336
    pad_rows = 2 * 64                           # embed_tokens + lm_head rows 32000..32063
    tinyllama, llama2_7b = 1_100_048_384 + pad_rows * 2048, 6_738_415_616 + pad_rows * 4096
    proj = lambda d: 1024 * d + d + d * d + d   # noqa: E731  linear_1 + linear_2 with biases
    assert realshape.params("tinyllava-1.5b") == tinyllama + vit_l_336 + proj(2048)
    assert realshape.params("llava-1.5-7b") == llama2_7b + vit_l_336 + proj(4096) == 7_063_427_072
    assert realshape.params("llava-1.5-7b", "clip") == 427_944_193     # openai/clip-vit-large-patch14-336


def test_plan_shards_like_save_pretrained():
    specs = [("a", (10,), "a"), ("b", (30,), "b"), ("c", (5,), "c"), ("d", (3,), "d")]
    assert [[spec[0] for spec in s] for s in realshape.plan_shards(specs, 2, 40)] == [["a"], ["b"], ["c", "d"]]
    assert len(realshape.plan_shards(specs, 2, 10 ** 9)) == 1


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        realshape.write_llava_checkpoint(tmp_path / "x", "tiny")
    with pytest.raises(ValueError, match="unknown shape"):
        realshape.write_llava_checkpoint(tmp_path / "y", "huge")


def test_synthetic_llama_tokenizer_used_without_the_vocab_file(monkeypatch):
    import realshape_tokenizers as rt

    monkeypatch.setattr(rt, "tokenizer_source", lambda: "synthetic")
    rt.llava_tokenizer.cache_clear()
    try:
        tok = rt.llava_tokenizer(5)
    finally:
        rt.llava_tokenizer.cache_clear()
    assert len(tok) == 32002 and tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    for text in ("A cat on a mat", "Ünïcode 🙂 and\ttabs"):
        ids = tok(text).input_ids
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text
