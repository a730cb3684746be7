"""safeclip-export as a user runs it: bad input gets one line and a non-zero exit; the Safe-CLIP tower swap."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safeclip.export import cli


def _err(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error" in l]
    assert "Traceback" not in err
    return lines


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/nonexistent/folder"], "no such folder"),
    (["--model", "some-org/not-cached-model"], "not available locally"),
    (["--descriptors", "/nonexistent.json"], "no such descriptor file"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--max-batch", "4"], "--max-batch sizes the TensorRT decode profile: it goes with --target jetson"),
    (["--max-batch", "0", "--target", "jetson"], "--max-batch must be 1..256, got 0"),
    (["--max-batch", "300", "--target", "datacenter"], "--max-batch must be 1..256, got 300"),
])
def test_bad_input_one_line_error(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(argv + ["--out", str(tmp_path / "out"), "--no-decoder"])
    lines = _err(capsys)
    assert rc != 0 and len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "out").exists()


def test_wrong_model_type_is_named(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc = cli.main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--no-decoder"])
    lines = _err(capsys)
    assert rc == 1 and "model_type 'bert' is not supported" in lines[0]


def _tower(tmp_path, demo_sources, **overrides):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(**{**demo_sources.llava.config.vision_config.to_dict(), **overrides})
    torch.manual_seed(99)
    tower = CLIPVisionModel(cfg)
    d = tmp_path / ("tower" + "".join(f"_{k}{v}" for k, v in overrides.items()))
    tower.save_pretrained(d)
    return d


def test_vision_tower_swap_matches_hf_after_the_same_swap(tmp_path, demo_sources, test_images, capsys):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration
    from safeclip.runtime.manifest import load_manifest
    from safeclip.runtime.pipeline import Pipeline

    tower_dir = _tower(tmp_path, demo_sources)
    out = tmp_path / "swapped"
    assert cli.main(["--vision-tower", str(tower_dir), "--out", str(out), "--no-decoder"]) == 0
    m = load_manifest(out)
    assert m.data["source"]["vision_tower"] == str(tower_dir) and m.data["source"]["model"] == "demo"

    pipe = Pipeline.load(out)
    img = sorted(test_images.iterdir())[0]
    feats, _ = pipe.encode(img)
    # oracle: transformers' LLaVA with the same tower swapped in by hand
    llava = LlavaForConditionalGeneration.from_pretrained(demo_sources.llava_path).eval()
    llava.model.vision_tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    pv = torch.from_numpy(pipe.pixel_values(img))
    with torch.no_grad():
        ref = llava.model.get_image_features(pixel_values=pv, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").pooler_output[0]
        orig = demo_sources.llava.model.get_image_features(pixel_values=pv, vision_feature_layer=-2,
                                                           vision_feature_select_strategy="default").pooler_output[0]
    assert np.max(np.abs(feats[0] - ref.numpy())) < 1e-4
    assert np.max(np.abs(feats[0] - orig.numpy())) > 1e-2          # the tower really changed


def test_vision_tower_shape_mismatch_is_refused(tmp_path, demo_sources, capsys):
    tower_dir = _tower(tmp_path, demo_sources, hidden_size=32, intermediate_size=64)
    rc = cli.main(["--vision-tower", str(tower_dir), "--out", str(tmp_path / "o"), "--no-decoder"])
    lines = _err(capsys)
    assert rc == 1 and "does not fit this LLaVA" in lines[0] and "hidden_size 32 != 64" in lines[0]
