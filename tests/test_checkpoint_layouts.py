"""The streaming exporter on checkpoints laid out as the published ones, with transformers as the oracle.

Each layout is exported (``export_bundle``) from a tiny random checkpoint and the bundle is served
(``Pipeline``): its preprocessing equals transformers' image processor of the same folder, and its vision
graph's image features and gate probabilities equal those computed from
``LlavaForConditionalGeneration.from_pretrained(folder, dtype=float32)`` and ``CLIPModel.from_pretrained`` by
plain transformers calls, within the exporter's fp32 tolerances (``FEATURE_ATOL``, ``PROB_ATOL``; features
also within 1e-4 of their largest value, as the tiny random ones are small: observed errors are ~5e-8).

Layouts (checkpoints written by ``scripts/realshape.py`` at its ``tiny`` shape, or the demo re-saved by
``save_pretrained``):

* sharded safetensors with ``model.safetensors.index.json`` (realshape's writer and ``save_pretrained``'s
  ``max_shard_size``) vs one ``model.safetensors``;
* ``dtype``/``torch_dtype`` float16 and bfloat16 with fp16 / bf16 tensors, exported as fp32 (``--target cpu``);
* the llava-hf legacy weight names and the transformers-5 names;
* ``preprocessor_config.json`` vs the image processor inside ``processor_config.json``;
* ``generation_config.json`` with an EOS list: the manifest holds every id and greedy generation stops at
  either, token for token as transformers' ``generate`` (the one export with the language model);
* ``--vision-tower`` from a separate fp16 ``CLIPVisionModel`` folder.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from safeclip.descriptors import load_descriptor_set  # noqa: E402
from safeclip.export.bundle import FEATURE_ATOL, PROB_ATOL, ExportOptions, export_bundle  # noqa: E402
from safeclip.runtime.graph_spec import VisionNames  # noqa: E402
from safeclip.runtime.manifest import load_manifest  # noqa: E402
from safeclip.runtime.pipeline import Pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import realshape  # noqa: E402

FEATURE_REL = 1e-4                     # features: also within 1e-4 of their largest magnitude (see check_served)
PIXEL_ATOL = 1e-6                      # runtime preprocessing vs transformers' PIL processors (test_image.py)
IMAGES = ("red.png", "wide.png")
LEGACY = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector.")
T5 = ("model.language_model.", "lm_head.", "model.vision_tower.", "model.multi_modal_projector.")
N_NEW = 16                             # tokens generated in the EOS test


# -- checkpoints and bundles, each built once -----------------------------------------------------------------
@pytest.fixture(scope="session")
def rs_clip(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rs") / "clip"
    realshape.write_clip_checkpoint(d, "tiny", "float16")
    return d


@pytest.fixture(scope="session")
def legacy(tmp_path_factory, rs_clip) -> dict:
    """realshape tiny: legacy names, fp16, 4 shards + index, preprocessor_config.json; vision-only bundle."""
    root = tmp_path_factory.mktemp("legacy")
    folder = root / "llava"
    realshape.write_llava_checkpoint(folder, "tiny", "float16", "legacy")
    bundle = export_bundle(ExportOptions(model=str(folder), clip=str(rs_clip), out=root / "bundle",
                                         with_decoder=False)).bundle
    return {"folder": folder, "bundle": bundle}


MODIFIED_PROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75], "resample": 2}


@pytest.fixture(scope="session")
def t5(tmp_path_factory, legacy, rs_clip) -> dict:
    """realshape tiny: transformers-5 names, bf16, one model.safetensors; the image processor (not the
    default one: other mean/std, bilinear) only inside processor_config.json, as LlavaProcessor saves it.

    Written with realshape's own pieces (weights, config) beside the legacy folder's tokenizer files, which
    ``write_llava_checkpoint`` would build again identically (seconds: its 32000-entry BPE)."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("t5")
    folder = root / "llava"
    folder.mkdir()
    shape = realshape.shape_of("tiny")
    realshape.write_weights(folder, realshape.llava_tensors(shape, "transformers5"), "bfloat16", 0, None)
    realshape._save_config(realshape.llava_config(shape, "bfloat16"), folder, "bfloat16")
    for f in legacy["folder"].iterdir():
        if f.suffix == ".json" and not f.name.startswith(("model", "config", realshape.STAMP)):
            shutil.copy(f, folder / f.name)           # tokenizer, chat template, generation and image processor
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre = {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}
    image_processor = CLIPImageProcessorPil(**{**pre, **MODIFIED_PROCESSOR})
    tok = AutoTokenizer.from_pretrained(folder)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (folder / name).unlink()
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=realshape.PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    bundle = export_bundle(ExportOptions(model=str(folder), clip=str(rs_clip), out=root / "bundle",
                                         with_decoder=False)).bundle
    return {"folder": folder, "bundle": bundle}


@pytest.fixture(scope="session")
def swapped(tmp_path_factory, legacy, rs_clip) -> dict:
    """The legacy checkpoint exported with --vision-tower: a separate fp16 CLIPVisionModel folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("swap")
    torch.manual_seed(1234)
    vcfg = CLIPVisionConfig(hidden_act="quick_gelu", **realshape.SHAPES["tiny"].vision)
    CLIPVisionModel(vcfg).half().save_pretrained(root / "tower")
    bundle = export_bundle(ExportOptions(model=str(legacy["folder"]), clip=str(rs_clip), out=root / "bundle",
                                         vision_tower=str(root / "tower"), with_decoder=False)).bundle
    return {"folder": legacy["folder"], "tower": root / "tower", "bundle": bundle}


def _prompt_ids(tok, n_image: int, prompt: str):
    """What LlavaProcessor feeds generate: the chat template, then <image> expanded to the model's positions."""
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                   add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok(text.replace("<image>", "<image>" * n_image)).input_ids])


def hf_greedy(llava, folder: Path, image: Path, prompt: str, max_new_tokens: int = N_NEW) -> list[int]:
    """transformers' greedy ``generate`` (the folder's tokenizer, template and image processor)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    ids = _prompt_ids(AutoTokenizer.from_pretrained(folder), llava.config.image_seq_length, prompt)
    pv = AutoImageProcessor.from_pretrained(folder)(images=Image.open(image).convert("RGB"),
                                                    return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _first_stop(seq: list[int], stops: set[int]) -> int | None:
    return next((i for i, t in enumerate(seq) if t in stops), None)


@pytest.fixture(scope="session")
def eos_case(tmp_path_factory, rs_clip, test_images) -> dict:
    """The demo LLaVA re-saved by ``save_pretrained(max_shard_size=...)`` with ``generation_config.json``
    ``eos_token_id: [2, a, b]``, where ``a`` ends image A's greedy answer early and ``b`` image B's (each
    chosen from transformers' own greedy output without EOS, so that the other ids do not occur before it);
    exported with the language model."""
    from transformers import LlavaForConditionalGeneration

    from safeclip.export.demo import build_demo

    root = tmp_path_factory.mktemp("eos")
    demo_dir, clip_dir = build_demo(root / "demo")
    model = LlavaForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).eval()
    eos0 = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    (ia, ib), prompt = (test_images / "blue.jpg", test_images / "red.png"), "What is in the picture?"
    sa, sb = hf_greedy(model, demo_dir, ia, prompt), hf_greedy(model, demo_dir, ib, prompt)
    pick = next(((a, b, ka, kb) for ka in range(1, N_NEW - 2) for kb in range(1, N_NEW - 2)
                 if (a := sa[ka]) != (b := sb[kb]) and _first_stop(sa, {eos0, a, b}) == ka
                 and _first_stop(sb, {eos0, a, b}) == kb), None)
    assert pick is not None, f"no EOS pair ends both greedy answers early: {sa} / {sb}"
    a, b, ka, kb = pick
    model.generation_config.eos_token_id = [eos0, a, b]
    folder = root / "llava"
    model.save_pretrained(folder, max_shard_size="300KB")
    for f in demo_dir.iterdir():                        # tokenizer, chat template, image processor
        if not (folder / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    bundle = export_bundle(ExportOptions(model=str(folder), clip=str(clip_dir), out=root / "bundle")).bundle
    return {"folder": folder, "clip": clip_dir, "bundle": bundle, "eos": [eos0, a, b],
            "images": (ia, ib), "prompt": prompt, "stops": ((a, ka), (b, kb)), "greedy": (sa, sb)}


# -- the oracle -----------------------------------------------------------------------------------------------
_HF: dict = {}


def hf_llava(folder: Path, tower: Path | None = None):
    """LLaVA from its folder in fp32 (every weight from the file), with ``tower`` swapped in as transformers
    users do it (``model.vision_tower = CLIPVisionModel.from_pretrained(...)``)."""
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    key = (str(folder), str(tower))
    if key not in _HF:
        m, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        if tower is not None:
            t, info = CLIPVisionModel.from_pretrained(tower, dtype=torch.float32, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            m.model.vision_tower = t
        _HF[key] = m.eval()
    return _HF[key]


def hf_clip(folder: Path):
    from transformers import CLIPModel

    if str(folder) not in _HF:
        _HF[str(folder)] = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    return _HF[str(folder)]


def hf_text_embeds(clip, clip_dir: Path, dset) -> "torch.Tensor":
    """[S, E] L2-normalised CLIP text embeddings of the descriptor sentences (CLIP's own tokenizer)."""
    from transformers import AutoTokenizer

    key = ("text", str(clip_dir), dset.sha256)
    if key not in _HF:
        enc = AutoTokenizer.from_pretrained(clip_dir)(dset.flat_sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            txt = clip.get_text_features(**enc).pooler_output
        _HF[key] = txt / txt.norm(dim=-1, keepdim=True)
    return _HF[key]


def hf_vision_gate(llava, clip, clip_dir: Path, pv: np.ndarray, dset) -> tuple[np.ndarray, np.ndarray]:
    """(image features [B, N, D_lm], class probabilities [B, C]) by plain transformers calls: LLaVA's own
    ``get_image_features``; SafeCLIP's reference gate = CLS of ``hidden_states[vision_feature_layer]`` ->
    CLIP ``visual_projection`` -> cosine with the descriptor sentences' CLIP text embeddings x 100 -> softmax
    over sentences, summed per class."""
    cfg = llava.config
    x = torch.from_numpy(pv)
    txt = hf_text_embeds(clip, clip_dir, dset)
    with torch.no_grad():
        feats = llava.model.get_image_features(pixel_values=x, vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = torch.stack(list(feats.pooler_output))
        cls = llava.model.vision_tower(x, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 0]
        img = clip.visual_projection(cls)
        img = img / img.norm(dim=-1, keepdim=True)
        p = torch.softmax(min(float(clip.logit_scale.exp()), 100.0) * img @ txt.T, dim=-1)
        probs = torch.zeros(p.shape[0], len(dset.classes)).index_add_(1, torch.tensor(dset.class_index), p)
    return feats.numpy(), probs.numpy()


_SERVED: dict = {}


def check_served(bundle: Path, folder: Path, clip_dir: Path, images: list[Path], tower: Path | None = None) -> dict:
    """The bundle as the runtime serves it vs transformers: preprocessing, image features, gate probabilities.
    Returns the figures (errors, the oracle's features) for the caller's own checks. Several layout tests
    share a bundle: a check that passed is not repeated (one that failed is, and fails again)."""
    key = (str(bundle), str(folder), str(clip_dir), tuple(map(str, images)), str(tower))
    if key not in _SERVED:
        _SERVED[key] = _check_served(bundle, folder, clip_dir, images, tower)
    return _SERVED[key]


def _check_served(bundle: Path, folder: Path, clip_dir: Path, images: list[Path], tower: Path | None) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor

    m = load_manifest(bundle)
    dset = load_descriptor_set("default")
    assert m.gate["classes"] == list(dset.classes)
    pv = AutoImageProcessor.from_pretrained(folder)(images=[Image.open(p).convert("RGB") for p in images],
                                                    return_tensors="np")["pixel_values"]
    ref_f, ref_p = hf_vision_gate(hf_llava(folder, tower), hf_clip(clip_dir), clip_dir, pv, dset)
    assert np.abs(ref_f).max() > 100 * FEATURE_ATOL and ref_p.max() - ref_p.min() > 100 * PROB_ATOL  # can fail
    pipe = Pipeline.load(bundle)
    out = pipe.vision.run(pv)                                         # the graph on transformers' pixels
    pixel_err = feat_err = prob_err = 0.0
    for i, image in enumerate(images):                                  # end to end: the runtime's own pixels
        pixel_err = max(pixel_err, float(np.abs(pipe.pixel_values(image) - pv[i:i + 1]).max()))
        feats, verdict = pipe.encode(image)
        feat_err = max(feat_err, float(np.abs(feats[0] - ref_f[i]).max()))
        prob_err = max(prob_err, float(np.abs(np.array([verdict.probs[c] for c in dset.classes]) - ref_p[i]).max()))
    feat, gate = VisionNames().outputs
    assert out[feat].shape == ref_f.shape and out[gate].shape == ref_p.shape
    graph_feat_err = float(np.abs(out[feat] - ref_f).max())
    graph_prob_err = float(np.abs(out[gate] - ref_p).max())
    assert pixel_err <= PIXEL_ATOL, f"preprocessing differs from transformers' by {pixel_err}"
    # the exporter's absolute tolerance, and as the tiny random features are small (|max| 0.04..0.08, where
    # 1e-4 alone lets a 0.1 % weight error through) the same relative to their largest value
    scale = float(np.abs(ref_f).max())
    assert max(feat_err, graph_feat_err) <= min(FEATURE_ATOL, FEATURE_REL * scale), \
        f"image features differ by {feat_err} / {graph_feat_err} (largest {scale})"
    assert max(prob_err, graph_prob_err) <= PROB_ATOL, f"gate probabilities differ by {prob_err} / {graph_prob_err}"
    return {"features": ref_f, "probs": ref_p, "pixel_values": pv, "feature_err": graph_feat_err}


def _tensors(folder: Path) -> dict[str, str]:
    """{checkpoint key: safetensors dtype code} over every safetensors file of the folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_slice(k).get_dtype() for k in st.keys()})
    return out


def _images(test_images: Path) -> list[Path]:
    return [test_images / n for n in IMAGES]


# -- one test per layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["realshape", "save_pretrained"])
def test_sharded_safetensors_with_index(writer, legacy, eos_case, rs_clip, test_images):
    case, clip = (legacy, rs_clip) if writer == "realshape" else (eos_case, eos_case["clip"])
    folder = case["folder"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    check_served(case["bundle"], folder, clip, _images(test_images))


def test_single_model_safetensors(t5, rs_clip, test_images):
    folder = t5["folder"]
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()
    check_served(t5["bundle"], folder, rs_clip, _images(test_images))


@pytest.mark.parametrize("dtype, code", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_checkpoint_exports_fp32_equal_to_transformers_fp32(dtype, code, legacy, t5, rs_clip,
                                                                          test_images):
    case = legacy if dtype == "float16" else t5
    cfg = json.loads((case["folder"] / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == dtype
    assert cfg["text_config"]["dtype"] == cfg["vision_config"]["torch_dtype"] == dtype
    assert set(_tensors(case["folder"]).values()) == {code}
    m = load_manifest(case["bundle"])
    assert m.data["build"]["precision"] == m.graphs["vision_gate"]["precision"] == "float32"
    assert m.graphs["vision_gate"]["outputs"][VisionNames.image_features]["dtype"] == "float32"
    check_served(case["bundle"], case["folder"], rs_clip, _images(test_images))


@pytest.mark.parametrize("layout, prefixes", [("legacy", LEGACY), ("transformers5", T5)])
def test_weight_names(layout, prefixes, legacy, t5, rs_clip, test_images):
    case = legacy if layout == "legacy" else t5
    keys = _tensors(case["folder"])
    for p in prefixes:
        assert any(k.startswith(p) for k in keys), p
    assert all(k.startswith(prefixes) for k in keys)
    if layout == "transformers5":
        assert not any(".vision_model." in k for k in keys)
    check_served(case["bundle"], case["folder"], rs_clip, _images(test_images))


def test_preprocessor_config_json(legacy, rs_clip, test_images):
    folder = legacy["folder"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert "image_processor" not in json.loads((folder / "processor_config.json").read_text())
    spec = load_manifest(legacy["bundle"]).preprocess
    assert spec["image_mean"] == pytest.approx(pre["image_mean"]) and spec["image_std"] == pytest.approx(pre["image_std"])
    check_served(legacy["bundle"], folder, rs_clip, _images(test_images))


def test_image_processor_inside_processor_config_json(t5, rs_clip, test_images):
    from transformers import AutoImageProcessor

    folder = t5["folder"]
    assert not (folder / "preprocessor_config.json").exists()
    inner = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    assert inner["image_std"] == MODIFIED_PROCESSOR["image_std"] and inner["resample"] == 2
    oracle = AutoImageProcessor.from_pretrained(folder)                 # transformers reads the same file
    assert list(oracle.image_std) == MODIFIED_PROCESSOR["image_std"] and oracle.resample == 2
    spec = load_manifest(t5["bundle"]).preprocess
    assert spec["image_mean"] == pytest.approx(MODIFIED_PROCESSOR["image_mean"])
    assert spec["image_std"] == pytest.approx(MODIFIED_PROCESSOR["image_std"])
    check_served(t5["bundle"], folder, rs_clip, _images(test_images))


def test_generation_config_eos_list(eos_case):
    from transformers import LlavaForConditionalGeneration

    folder = eos_case["folder"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == eos_case["eos"]
    m = load_manifest(eos_case["bundle"])
    assert m.data["model"]["eos_token_ids"] == eos_case["eos"]
    pipe = Pipeline.load(eos_case["bundle"])
    oracle = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()   # the EOS list
    for image, (stop, k), free in zip(eos_case["images"], eos_case["stops"], eos_case["greedy"]):
        ref = hf_greedy(oracle, folder, image, eos_case["prompt"])
        assert ref == free[:k + 1] and ref[-1] == stop                  # transformers stops there too
        a = pipe.generate(image, eos_case["prompt"], policy="annotate", max_new_tokens=N_NEW)
        assert list(a.token_ids) == ref and a.finish_reason == "eos", (a.token_ids, ref, a.finish_reason)
    assert {s for s, _ in eos_case["stops"]} == set(eos_case["eos"][1:])  # each listed id stopped one answer


def test_vision_tower_swap_from_a_separate_folder(swapped, legacy, rs_clip, test_images):
    assert set(_tensors(swapped["tower"]).values()) == {"F16"}
    m = load_manifest(swapped["bundle"])
    assert m.data["source"]["vision_tower"] == str(swapped["tower"])
    assert m.data["source"]["model"] == str(swapped["folder"])
    got = check_served(swapped["bundle"], swapped["folder"], rs_clip, _images(test_images), tower=swapped["tower"])
    original = check_served(legacy["bundle"], legacy["folder"], rs_clip, _images(test_images))
    # the weights came from the tower folder: the features are not the original tower's
    assert np.abs(got["features"] - original["features"]).max() > 100 * FEATURE_ATOL
