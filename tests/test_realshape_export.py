"""A real-size export end to end (slow tier; `pytest -m slow tests/test_realshape_export.py`, ~10 min, ~12 GB).

A TinyLLaVA-1.5B-shaped checkpoint (TinyLlama-1.1B + CLIP ViT-L/14-336, random fp16 weights, laid out as llava-hf
publishes them; ``scripts/realshape.py``) is exported by ``safeclip-export --target cpu`` and served by the
runtime; transformers is the oracle on the same checkpoint: the image features of the runtime's vision graph,
and the greedy tokens of a gated answer, equal ``LlavaForConditionalGeneration.from_pretrained`` (fp32)
``generate`` on the runtime's own prompt ids and pixel values.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import realshape  # noqa: E402

pytestmark = pytest.mark.slow
IMAGE = Path(__file__).parent / "data" / "house.jpg"
WORK = Path(os.environ.get("SAFECLIP_BENCH_WORK", "/work/bench_ckpt")) / "ckpt"


def _checkpoint(kind: str, folder: Path, tmp_path_factory):
    """Reuse bench_export's cached checkpoint when it is there and complete, else write one."""
    write = realshape.write_llava_checkpoint if kind == "llava" else realshape.write_clip_checkpoint
    spec = (realshape.llava_spec("tinyllava-1.5b", "float16", "legacy", None, 0) if kind == "llava"
            else realshape.clip_spec("tinyllava-1.5b", "float16", 0))
    if folder.is_dir() and realshape.stamp_matches(folder, spec):
        return folder
    out = tmp_path_factory.mktemp(kind) / kind
    write(out, "tinyllava-1.5b", "float16")
    return out


def test_tinyllava_1_5b_cpu_export_answers_as_transformers(tmp_path_factory):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from safeclip.export.cli import main
    from safeclip.runtime.pipeline import Pipeline

    llava = _checkpoint("llava", WORK / "tinyllava-1.5b-fp16-legacy", tmp_path_factory)
    clip = _checkpoint("clip", WORK / "clip-vit-l-14-336-fp16", tmp_path_factory)
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["--model", str(llava), "--clip", str(clip), "--target", "cpu", "--policy", "annotate",
                 "--out", str(out)]) == 0

    prompt, n = "What is in the picture?", 8
    pipe = Pipeline.load(out)
    pixel_values = pipe.pixel_values(IMAGE)                       # [1, 3, 336, 336], the runtime's own
    features, _ = pipe.encode(IMAGE)
    answer = pipe.generate(IMAGE, prompt, max_new_tokens=n)
    del pipe

    processor = AutoProcessor.from_pretrained(llava)              # its published chat template, <image> expansion
    model = LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True, tokenize=False)
    ids = processor(text=text, images=Image.open(IMAGE).convert("RGB"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixel_values))
        ref = getattr(ref, "pooler_output", ref)
        ref = torch.cat(list(ref), 0) if isinstance(ref, (list, tuple)) else ref
        np.testing.assert_allclose(np.asarray(features).reshape(ref.shape), ref.numpy(), atol=1e-4)
        out_ids = model.generate(input_ids=ids, pixel_values=torch.from_numpy(pixel_values),
                                 attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    assert answer.prompt_tokens == ids.shape[1]
    assert list(answer.token_ids) == out_ids[0, ids.shape[1]:].tolist()
