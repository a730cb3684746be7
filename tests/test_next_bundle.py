"""LLaVA-NeXT through the whole product: export (demo-next) -> bundle -> Pipeline, against transformers'
LlavaNextForConditionalGeneration.generate with its own processor, for several image sizes and aspect ratios."""
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from safeclip.runtime.manifest import load_manifest
from safeclip.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def next_setup(tmp_path_factory, cache_dir):
    from safeclip.export.bundle import ExportOptions, export_bundle
    from safeclip.export.checkpoint import load_sources

    root = tmp_path_factory.mktemp("next")
    bundle = export_bundle(ExportOptions(model="demo-next", out=root / "bundle")).bundle
    src = load_sources("demo-next", None, root / "src")
    return Pipeline.load(bundle), bundle, src


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_manifest_records_anyres(next_setup):
    _, bundle, _ = next_setup
    m = load_manifest(bundle)
    assert m.data["architecture"] == "llava_next"
    assert m.preprocess["anyres"]["grid_pinpoints"] and m.gate["views"] == "any"
    assert m.graphs["vision_gate"]["image_newline"] in m.data["files"]


@pytest.mark.parametrize("h, w", [(168, 168), (100, 300), (400, 90), (90, 130)])
def test_greedy_tokens_equal_hf_generate(next_setup, h, w):
    from transformers import AutoProcessor

    pipe, _, src = next_setup
    img = _image(h, w, h * w)
    prompt = "What is in the picture?"
    a = pipe.generate(img, prompt, policy="annotate", max_new_tokens=16)
    proc = AutoProcessor.from_pretrained(src.llava_path)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                    add_generation_prompt=True)
    inputs = proc(images=img, text=text, return_tensors="pt")
    with torch.no_grad():
        out = src.llava.generate(**inputs, max_new_tokens=16, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert a.prompt_tokens == inputs["input_ids"].shape[1]
    assert list(a.token_ids) == ref


def test_view_aggregation_is_a_manifest_setting(next_setup, tmp_path):
    """The same image under 'base' and 'any': 'any' can only add flags, and reports a view when it flags."""
    import json
    import shutil
    from safeclip.runtime.manifest import write_manifest

    pipe, bundle, _ = next_setup
    img = _image(168, 168, 5)
    probs_any = pipe.gate(img)
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    d = json.loads((b / "manifest.json").read_text())
    d["gate"]["views"] = "base"
    write_manifest(b, d)
    v_base = Pipeline.load(b).gate(img)
    assert v_base.view in (None, 0)
    if v_base.flagged:
        assert probs_any.flagged
    if probs_any.flagged:
        assert probs_any.view is not None
