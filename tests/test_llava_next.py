"""LLaVA-NeXT ("anyres"): registry, view splitting, feature packing, token counts, greedy generation and the
per-view gate, against transformers' own ``LlavaNextImageProcessorPil``, ``LlavaNextProcessor`` and
``LlavaNextForConditionalGeneration`` on the tiny model of ``export/demo_next.py`` (built once per module).

Tolerances: pixel_values 1e-6 (same Pillow resizes on uint8, same float arithmetic: observed 0.0); packing
is pure indexing, so packing HF's own per-view features must be exact (0.0); features through our
VisionGate vs ``get_image_features`` 1e-5; ONNX Runtime graph vs HF 1e-4; first-step logits 1e-4; greedy
tokens identical.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from safeclip.descriptors import load_descriptor_set
from safeclip.export.architectures import ARCHITECTURES, read_preprocessor_config, spec_for
from safeclip.runtime.anyres import (anyres_spec_from_config, anyres_views, features_for_image, max_views,
                                     num_image_tokens, pack_features, select_best_resolution)
from safeclip.runtime.gate import aggregate_views

from conftest import gate_embedding

# (height, width): square, wide, tall, very wide, very tall, small, tiny, single pixel, exactly one tile
SIZES = [(168, 168), (100, 300), (400, 90), (37, 500), (640, 48), (90, 130), (5, 7), (1, 1), (84, 84)]
PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    """The tiny LLaVA-NeXT, its CLIP, HF processor and our anyres spec (loaded as the exporter would)."""
    from transformers import AutoProcessor, CLIPModel

    from safeclip.export.checkpoint import Sources

    arch = spec_for("llava_next")
    model_dir, clip_dir = arch.tiny_test_model(tmp_path_factory.mktemp("demo_next"))
    model = arch.model_cls().from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32, attn_implementation="eager").eval()
    src = Sources(model, clip, model_dir, clip_dir, "demo-next", "demo", None, None, arch=arch)
    spec = arch.preprocess_spec(read_preprocessor_config(model_dir), model.config)
    return {"arch": arch, "src": src, "model": model, "processor": AutoProcessor.from_pretrained(model_dir),
            "spec": spec, "parts": arch.vision_parts(model)}


@pytest.fixture(scope="module")
def gate(nxt):
    """The VisionGate module built from the registry's vision parts and the default descriptor bank."""
    from safeclip.export.descriptors import logit_scale_of, text_embeddings
    from safeclip.export.vision_gate import VisionGate

    p, src, dset = nxt["parts"], nxt["src"], load_descriptor_set("default")
    return VisionGate(p.tower, p.projector, p.feature_layer, p.select_strategy, "reference",
                      src.clip.visual_projection, text_embeddings(src.clip, src.clip_path, dset),
                      dset.class_index, len(dset.classes), logit_scale_of(src.clip)).eval()


def hf_features(model, pixel_values, image_size) -> np.ndarray:
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=torch.as_tensor(pixel_values),
                                             image_sizes=torch.tensor([list(image_size)]))
    return out.pooler_output[0].numpy()                                         # [L, D]


# -- registry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_has_a_working_tiny_model(model_type, tmp_path, nxt):
    """Registry coverage: each entry's tiny model builds, is of that type, loads and yields vision parts."""
    import json
    arch = ARCHITECTURES[model_type]
    assert callable(arch.tiny_test_model), f"{model_type} registers no tiny test model"
    if model_type == "llava_next":                                 # built once already by the fixture
        model, model_dir = nxt["model"], nxt["src"].llava_path
    else:
        model_dir, _ = arch.tiny_test_model(tmp_path)
        model = arch.model_cls().from_pretrained(model_dir).eval()
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == model_type
    assert type(model).__name__ == arch.model_class
    parts = arch.vision_parts(model)
    assert (parts.image_newline is not None) == arch.anyres
    spec = arch.preprocess_spec(read_preprocessor_config(model_dir), model.config)
    assert ("anyres" in spec) == arch.anyres


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"'qwen2_vl' is not supported \(supported: llava, llava_next\)"):
        spec_for("qwen2_vl")
    with pytest.raises(ValueError, match="supported: llava, llava_next"):
        spec_for(None)


def test_vision_parts_are_the_models(nxt):
    p, m = nxt["parts"], nxt["model"]
    assert p.tower is m.model.vision_tower and p.projector is m.model.multi_modal_projector
    np.testing.assert_array_equal(p.image_newline, m.model.image_newline.detach().numpy())
    assert p.feature_layer == -2 and p.select_strategy == "default"


# -- views ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", SIZES)
def test_views_match_hf_processor(nxt, hw):
    im = noise(*hw, seed=hw[0] * 7 + hw[1])
    pv, size = anyres_views(im, nxt["spec"])
    hf = nxt["processor"].image_processor(im, return_tensors="np")
    ref = hf["pixel_values"][0]                                   # [1 + T, 3, 84, 84] (one image: no batch padding)
    assert size == tuple(int(v) for v in hf["image_sizes"][0]) == hw
    assert pv.shape == ref.shape and pv.dtype == np.float32
    assert np.max(np.abs(pv - ref)) <= 1e-6
    rows, cols = (s // 84 for s in select_best_resolution(hw, nxt["spec"]["anyres"]["grid_pinpoints"]))
    assert pv.shape[0] == 1 + rows * cols <= max_views(nxt["spec"]["anyres"]["grid_pinpoints"], 84) == 5


def test_spec_refuses_what_it_cannot_reproduce(nxt):
    cfg = read_preprocessor_config(nxt["src"].llava_path)
    with pytest.raises(ValueError, match="not an anyres processor"):
        anyres_spec_from_config({**cfg, "image_processor_type": "CLIPImageProcessor"}, 84, 14)
    with pytest.raises(ValueError, match="not a multiple of the tile size 84"):
        anyres_spec_from_config({**cfg, "image_grid_pinpoints": [[84, 100]]}, 84, 14)
    with pytest.raises(ValueError, match="differ from the model's"):
        anyres_spec_from_config(cfg, 84, 14, [[84, 168]])
    with pytest.raises(ValueError, match="crop_size 112x112"):
        anyres_spec_from_config({**cfg, "image_grid_pinpoints": [[112, 224]]}, 112, 14)
    with pytest.raises(ValueError, match="'foo'"):
        anyres_spec_from_config({**cfg, "foo": 1}, 84, 14)


# -- packing and token counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("hw", SIZES)
def test_packing_matches_hf(nxt, gate, hw):
    m, spec, a = nxt["model"], nxt["spec"], nxt["spec"]["anyres"]
    pv, size = anyres_views(noise(*hw, seed=1), spec)
    ref = hf_features(m, pv, size)
    # our packing of HF's own per-view features: pure indexing, must be exact
    with torch.no_grad():
        hs = m.model.vision_tower(torch.from_numpy(pv), output_hidden_states=True).hidden_states[-2][:, 1:]
        views = m.model.multi_modal_projector(hs).numpy()           # [1 + T, 36, 64]
    packed = pack_features(views, size, a["grid_pinpoints"], 84, 14, nxt["parts"].image_newline)
    assert packed.shape == ref.shape
    assert np.array_equal(packed, ref)
    assert num_image_tokens(size, a["grid_pinpoints"], 84, 14) == ref.shape[0]
    # the exported module's per-view features, packed: what the runtime does
    with torch.no_grad():
        feats, _ = gate(torch.from_numpy(pv))
    ours = features_for_image(feats.numpy(), size, spec, nxt["parts"].image_newline)
    assert ours.shape == (1,) + ref.shape
    assert np.max(np.abs(ours[0] - ref)) <= 1e-5


def test_token_count_matches_hf_processor_sweep(nxt):
    """num_image_tokens vs LlavaNextProcessor's own count over many sizes (no model run)."""
    proc, pins = nxt["processor"], nxt["spec"]["anyres"]["grid_pinpoints"]
    rng = np.random.default_rng(5)
    sizes = [tuple(int(v) for v in rng.integers(1, 1200, 2)) for _ in range(300)] + SIZES
    want = proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    got = [num_image_tokens(s, pins, 84, 14) for s in sizes]
    assert got == want
    # and with llava-v1.6's real geometry (336 px tiles, patch 14, its five pinpoints)
    real = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    proc_real = type(proc)(image_processor=type(proc.image_processor)(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=real),
        tokenizer=proc.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    want = proc_real._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [num_image_tokens(s, real, 336, 14) for s in sizes] == want


def test_prompt_expansion_matches_hf_processor(nxt):
    proc, a = nxt["processor"], nxt["spec"]["anyres"]
    tok, image_id = proc.tokenizer, nxt["model"].config.image_token_id
    for hw in SIZES[:5]:
        ids = np.asarray(tok(PROMPT)["input_ids"])
        n = num_image_tokens(hw, a["grid_pinpoints"], a["tile_size"], a["patch_size"])
        ours = np.repeat(ids, np.where(ids == image_id, n, 1))
        hf = proc(text=PROMPT, images=noise(*hw), return_tensors="np")["input_ids"][0]
        np.testing.assert_array_equal(ours, hf)


def test_chat_template_renders_like_hf(nxt):
    from safeclip.runtime.prompt import render
    template = nxt["processor"].tokenizer.chat_template
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
    assert nxt["processor"].apply_chat_template(msgs, add_generation_prompt=True) == PROMPT
    assert render(template, "What is in this picture?", True) == PROMPT


def test_pack_refuses_bad_input(nxt):
    a, nl = nxt["spec"]["anyres"], nxt["parts"].image_newline
    with pytest.raises(ValueError, match="'default' only"):
        pack_features(np.zeros((5, 37, 64), np.float32), (168, 168), a["grid_pinpoints"], 84, 14, nl, "full")
    with pytest.raises(ValueError, match="do not fit a 2x2 grid"):
        pack_features(np.zeros((4, 36, 64), np.float32), (168, 168), a["grid_pinpoints"], 84, 14, nl)
    with pytest.raises(ValueError, match="image_newline has 3 values"):
        pack_features(np.zeros((5, 36, 64), np.float32), (168, 168), a["grid_pinpoints"], 84, 14, np.zeros(3))


# -- generation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(168, 168), (37, 500), (640, 48), (90, 130)])
def test_greedy_tokens_match_hf_generate(nxt, gate, hw):
    """Our views + VisionGate features + numpy packing + our token expansion -> the same greedy tokens."""
    m, proc, spec, a = nxt["model"], nxt["processor"], nxt["spec"], nxt["spec"]["anyres"]
    im = noise(*hw, seed=11)
    hf_in = proc(text=PROMPT, images=im, return_tensors="pt")
    with torch.no_grad():
        hf_logits = m(**hf_in).logits[0, -1]
        hf_tokens = m.generate(**hf_in, max_new_tokens=8, do_sample=False)[0, hf_in["input_ids"].shape[1]:]

    pv, size = anyres_views(im, spec)
    with torch.no_grad():
        feats, _ = gate(torch.from_numpy(pv))
    packed = features_for_image(feats.numpy(), size, spec, nxt["parts"].image_newline)[0]
    ids = np.asarray(proc.tokenizer(PROMPT)["input_ids"])
    image_id = m.config.image_token_id
    ids = np.repeat(ids, np.where(ids == image_id, num_image_tokens(size, a["grid_pinpoints"], 84, 14), 1))
    ids_t = torch.from_numpy(ids)[None]
    with torch.no_grad():
        embeds = m.get_input_embeddings()(ids_t)
        embeds[ids_t == image_id] = torch.from_numpy(packed)
        logits = m(inputs_embeds=embeds).logits[0, -1]
        tokens = m.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids_t), max_new_tokens=8,
                            do_sample=False)[0]
        # negative control: the same features with the tiles in reverse order must be told apart
        f = feats.numpy()
        wrong = features_for_image(np.concatenate([f[:1], f[:0:-1]]), size, spec, nxt["parts"].image_newline)[0]
        embeds[ids_t == image_id] = torch.from_numpy(wrong)
        wrong_logits = m(inputs_embeds=embeds).logits[0, -1]
    assert torch.max(torch.abs(logits - hf_logits)) <= 1e-4
    assert torch.max(torch.abs(wrong_logits - hf_logits)) > 1e-3
    assert tokens.tolist() == hf_tokens.tolist()


# -- per-view gate ----------------------------------------------------------------------------------------
CLASSES = ["neutral", "porn", "blood", "gun"]


def test_aggregation_when_tiles_disagree():
    p = np.array([[0.90, 0.05, 0.03, 0.02],          # base: neutral
                  [0.80, 0.10, 0.05, 0.05],          # tile 1: neutral
                  [0.10, 0.05, 0.70, 0.15],          # tile 2: blood 0.70
                  [0.05, 0.05, 0.05, 0.85]])         # tile 3: gun 0.85
    v, i = aggregate_views(p, CLASSES, ["neutral"], 0.6, "any")
    assert (v.flagged, v.category, v.score, i) == (True, "gun", 0.85, 3)
    assert v.probs["gun"] == 0.85 and v.probs["neutral"] == 0.05          # the triggering view's probabilities
    v, i = aggregate_views(p, CLASSES, ["neutral"], 0.8, "any")
    assert (v.flagged, v.category, i) == (True, "gun", 3)
    v, i = aggregate_views(p, CLASSES, ["neutral"], 0.9, "any")          # nothing flags: the base view's verdict
    assert (v.flagged, v.category, v.score, i) == (False, "neutral", 0.90, None)
    v, i = aggregate_views(p, CLASSES, ["neutral"], 0.6, "base")
    assert (v.flagged, v.category, i) == (False, "neutral", None)
    v, i = aggregate_views(p, CLASSES, ["neutral"], 0.6, "mean")
    assert (v.flagged, v.category, i) == (False, "neutral", None)
    assert v.score == pytest.approx(p[:, 0].mean())
    v, i = aggregate_views(p, CLASSES, ["neutral"], 0.4, "mean")          # mean neutral 0.4625 > 0.4 but safe
    assert not v.flagged
    q = p.copy()
    q[0] = [0.1, 0.1, 0.1, 0.7]                                            # base itself flags
    assert aggregate_views(q, CLASSES, ["neutral"], 0.6, "base")[1] == 0
    assert aggregate_views(q, CLASSES, ["neutral"], 0.6, "any")[1] == 3   # 0.85 beats 0.70
    q[0] = [0.05, 0.05, 0.05, 0.85]                                        # tie: the lowest index
    assert aggregate_views(q, CLASSES, ["neutral"], 0.6, "any")[1] == 0
    mean_flag = np.array([[0.2, 0.7, 0.05, 0.05], [0.4, 0.5, 0.05, 0.05]])
    v, i = aggregate_views(mean_flag, CLASSES, ["neutral"], 0.55, "mean")
    assert (v.flagged, v.category, i) == (True, "porn", None) and v.score == pytest.approx(0.6)


def test_aggregation_fails_closed():
    good = np.full((3, 4), 0.25)
    for mode in ("any", "base", "mean"):
        bad = good.copy()
        bad[2, 1] = np.nan                                                 # a tile, even in "base" mode
        v, i = aggregate_views(bad, CLASSES, ["neutral"], 0.6, mode)
        assert v.flagged and v.category == "unknown" and "view 2" in v.reason and i == 2
        for broken in (None, np.zeros((0, 4)), np.zeros((3, 5)), np.zeros(4)):
            v, i = aggregate_views(broken, CLASSES, ["neutral"], 0.6, mode)
            assert v.flagged and v.category == "unknown" and v.reason and i is None
    with pytest.raises(ValueError, match="supported: any, base, mean"):
        aggregate_views(good, CLASSES, ["neutral"], 0.6, "max")


def test_one_toxic_tile_flags_end_to_end(nxt, tmp_path):
    """A 168x168 image (2x2 tiles) whose bottom-left quadrant is a pattern; the descriptor bank is built so
    that only the pattern's view is toxic. Exported graph (ONNX Runtime) on our views: ``any`` flags and
    names tile 3 (row 1, col 0), ``base`` does not; packed features still match HF."""
    from safeclip.export.bundle import export_vision_gate
    from safeclip.runtime.gate import verdict_from_probs

    dset = load_descriptor_set("default")
    arr = np.full((168, 168, 3), 128, np.uint8)
    arr[84:, :84] = np.random.default_rng(3).integers(0, 256, (84, 84, 3), dtype=np.uint8)
    pv, size = anyres_views(Image.fromarray(arr), nxt["spec"])
    assert pv.shape[0] == 5
    emb = gate_embedding(nxt["src"], pv)                                  # oracle: HF tower + CLIP projection
    rng = np.random.default_rng(0)
    toxic = "gun"
    rows, clean = [], [0, 1, 2, 4, 0]                                     # neutral: every other view's embedding
    for cls, group in zip(dset.classes, dset.sentences):
        for k in range(len(group)):
            base = emb[3] if cls == toxic else emb[clean[k % 5]] if cls in dset.safe_classes \
                else rng.normal(size=emb.shape[1])
            v = base + 0.01 * rng.normal(size=emb.shape[1])
            rows.append(v / np.linalg.norm(v))
    te = torch.tensor(np.stack(rows), dtype=torch.float32)

    graph, res = export_vision_gate(nxt["src"], dset, "reference", tmp_path, text_embeds=te)
    assert graph["inputs"]["pixel_values"]["shape"] == ["batch", 3, 84, 84]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / graph["file"]), providers=["CPUExecutionProvider"])
    feats, probs = sess.run(["image_features", "class_probs"], {"pixel_values": pv})   # all 5 views, one pass

    classes, safe = list(dset.classes), list(dset.safe_classes)
    per_view = [verdict_from_probs(p, classes, safe, dset.default_threshold).flagged for p in probs]
    assert per_view == [False, False, False, True, False]
    v, i = aggregate_views(probs, classes, safe, dset.default_threshold, "any")
    assert (v.flagged, v.category, i) == (True, toxic, 3) and v.score > 0.9
    v, i = aggregate_views(probs, classes, safe, dset.default_threshold, "base")
    assert (v.flagged, i) == (False, None)
    v, _ = aggregate_views(probs, classes, safe, dset.default_threshold, "mean")
    assert not v.flagged and v.probs[toxic] == pytest.approx(float(probs[:, classes.index(toxic)].mean()))
    packed = features_for_image(feats, size, nxt["spec"], nxt["parts"].image_newline)[0]
    assert np.max(np.abs(packed - hf_features(nxt["model"], pv, size))) <= 1e-4
