"""Vision+gate module vs plain transformers calls (oracle), and its ONNX export vs the module."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safeclip.descriptors import load_descriptor_set
from safeclip.export.bundle import export_vision_gate, vision_gate_from_sources
from safeclip.runtime.gate import verdict_from_probs

from conftest import gate_embedding


def reference_class_probs(sources, dset, pixel_values, variant):
    """Plain reimplementation of SafeCLIP's scoring, from HF outputs (no code shared with the exporter)."""
    img = gate_embedding(sources, pixel_values, variant)                       # [B, E]
    tok_path = sources.clip_path
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_path)
    enc = tok(dset.flat_sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        t = sources.clip.get_text_features(**enc).pooler_output.numpy()
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    logits = 100.0 * img @ t.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros((img.shape[0], len(dset.classes)))
    idx = 0
    for c, group in enumerate(dset.sentences):
        # the reference's "mean probability x sentences per class" is the class's summed probability
        out[:, c] = p[:, idx: idx + len(group)].mean(-1) * len(group)
        idx += len(group)
    return out


@pytest.mark.parametrize("variant", ["reference", "clip"])
@pytest.mark.parametrize("dname", ["default", "extended"])
def test_module_matches_transformers(demo_sources, variant, dname):
    dset = load_descriptor_set(dname)
    m = vision_gate_from_sources(demo_sources, dset, variant)
    pv = torch.from_numpy(np.random.default_rng(0).uniform(-1.5, 2, (2, 3, 336, 336)).astype(np.float32))
    with torch.no_grad():
        feats, probs = m(pv)
        hf = demo_sources.llava.model.get_image_features(
            pixel_values=pv, vision_feature_layer=demo_sources.llava.config.vision_feature_layer,
            vision_feature_select_strategy=demo_sources.llava.config.vision_feature_select_strategy).pooler_output
    hf = torch.stack(list(hf))
    assert feats.shape == hf.shape == (2, 576, 64)
    assert torch.max(torch.abs(feats - hf)) < 1e-5
    ref = reference_class_probs(demo_sources, dset, pv.numpy(), variant)
    assert probs.shape == (2, len(dset.classes))
    assert np.max(np.abs(probs.numpy() - ref)) < 1e-5
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, atol=1e-5)


def test_reference_variant_skips_the_last_layer(demo_sources):
    dset = load_descriptor_set("default")
    n = demo_sources.llava.config.vision_config.num_hidden_layers
    assert len(vision_gate_from_sources(demo_sources, dset, "reference").layers) == n - 1
    assert len(vision_gate_from_sources(demo_sources, dset, "clip").layers) == n
    assert vision_gate_from_sources(demo_sources, dset, "reference").post_layernorm is None


def test_onnx_export_parity_and_verdicts(demo_sources, tmp_path):
    dset = load_descriptor_set("default")
    graph, res = export_vision_gate(demo_sources, dset, "reference", tmp_path)
    assert res.max_abs_err["image_features"] <= 1e-4 and res.max_abs_err["class_probs"] <= 1e-5
    assert graph["outputs"]["class_probs"]["shape"] == ["batch", 8]
    # dynamic batch: batch 3 runs and agrees with the module
    import onnxruntime as ort
    s = ort.InferenceSession(str(tmp_path / "vision_gate.onnx"), providers=["CPUExecutionProvider"])
    pv = np.random.default_rng(3).uniform(-1, 1, (3, 3, 336, 336)).astype(np.float32)
    feats, probs = s.run(None, {"pixel_values": pv})
    m = vision_gate_from_sources(demo_sources, dset, "reference")
    with torch.no_grad():
        tf, tp = m(torch.from_numpy(pv))
    assert feats.shape == (3, 576, 64)
    assert np.max(np.abs(probs - tp.numpy())) < 1e-5
    for a, b in zip(probs, tp.numpy()):
        for t in (0.0, 0.2, 0.6):
            va = verdict_from_probs(a, list(dset.classes), ["neutral"], t)
            vb = verdict_from_probs(b, list(dset.classes), ["neutral"], t)
            assert (va.flagged, va.category) == (vb.flagged, vb.category)


def test_parity_failure_stops_with_named_output(demo_sources, tmp_path, monkeypatch):
    from safeclip.export import bundle, parity

    real = parity.run_onnx

    def corrupt(path, inputs, names=None, threads=None):
        out = real(path, inputs, names, threads)
        if "class_probs" in out:
            out["class_probs"] = out["class_probs"] + 1e-3
        return out

    monkeypatch.setattr(parity, "run_onnx", corrupt)
    with pytest.raises(parity.ParityError, match=r"class_probs.*1\.0+e-03.*1e-05"):
        bundle.export_vision_gate(demo_sources, load_descriptor_set("default"), "reference", tmp_path)
