"""Bundles: atomic writing, manifest contract, and refusal of anything tampered, incomplete or ungated."""
import json
import subprocess
import sys

import numpy as np
import pytest

from safeclip.runtime.gate import verdict_from_probs
from safeclip.runtime.manifest import BundleError, MANIFEST, load_manifest, write_manifest
from safeclip.runtime.pipeline import Pipeline

from conftest import copy_bundle


def test_manifest_contract(vision_bundle):
    m = load_manifest(vision_bundle, full_verify=True)
    d = m.data
    for key in ("schema_version", "source", "target", "files", "graphs", "preprocess", "gate", "tokenizer",
                "prompt", "producer", "integrity"):
        assert key in d
    for name, entry in d["files"].items():
        assert (vision_bundle / name).stat().st_size == entry["size"]
    g = d["gate"]
    assert g["variant"] == "reference" and g["threshold"] == 0.6 and g["safe_classes"] == ["neutral"]
    assert g["descriptors"]["name"] == "default" and len(g["descriptors"]["sentences"]) == 8
    assert d["graphs"]["vision_gate"]["outputs"]["class_probs"]["shape"] == ["batch", 8]
    assert d["preprocess"]["image_mean"] and d["prompt"]["chat_template"]


def test_pipeline_gates_images(vision_bundle, test_images):
    pipe = Pipeline.load(vision_bundle)
    for f in sorted(test_images.iterdir()):
        feats, v = pipe.encode(f)
        assert feats.shape == (1, 576, 64)
        assert abs(sum(v.probs.values()) - 1) < 1e-4 and v.category in pipe.classes
        assert v.flagged == (v.category != "neutral" and v.score > 0.6)


def _reseal(bundle, mutate):
    p = bundle / MANIFEST
    d = json.loads(p.read_text())
    mutate(d)
    write_manifest(bundle, d)


@pytest.mark.parametrize("case, message", [
    ("flip_byte_data", "sha256 of 'vision_gate.onnx.data'"),
    ("truncate_graph", "truncated"),
    ("delete_tokenizer", "missing"),
    ("edit_threshold", "integrity"),
    ("schema_99", "unknown schema version"),
    ("no_gate_resealed", "no gate section"),
    ("gate_width_resealed", "width"),
    ("garbage_manifest", "unreadable manifest"),
    ("no_manifest", "not a bundle"),
])
def test_refuses_bad_bundles(vision_bundle, tmp_path, case, message):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    if case == "flip_byte_data":
        f = b / "vision_gate.onnx.data"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif case == "truncate_graph":
        f = b / "vision_gate.onnx"
        f.write_bytes(f.read_bytes()[:-10])
    elif case == "delete_tokenizer":
        (b / "tokenizer.json").unlink()
    elif case == "edit_threshold":
        d = json.loads((b / MANIFEST).read_text())
        d["gate"]["threshold"] = 1.0
        (b / MANIFEST).write_text(json.dumps(d))
    elif case == "schema_99":
        _reseal(b, lambda d: d.update(schema_version=99))
    elif case == "no_gate_resealed":
        _reseal(b, lambda d: d.pop("gate"))
    elif case == "gate_width_resealed":
        _reseal(b, lambda d: d["gate"].update(classes=d["gate"]["classes"][:-1]))
    elif case == "garbage_manifest":
        (b / MANIFEST).write_text("{not json")
    elif case == "no_manifest":
        (b / MANIFEST).unlink()
    with pytest.raises(BundleError) as e:
        Pipeline.load(b, full_verify=True)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_refuses_vision_graph_without_gate_output(vision_bundle, tmp_path):
    """A consistent, resealed bundle whose vision graph was replaced by one without class_probs."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, TensorProto
    from safeclip.runtime.manifest import sha256_file

    b = copy_bundle(vision_bundle, tmp_path / "b")
    g = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["image_features"])], "ungated",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 336, 336])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", 3, 336, 336]),
         helper.make_tensor_value_info("class_probs_missing", TensorProto.FLOAT, ["batch", 8])])
    g.node.append(helper.make_node("ReduceMean", ["pixel_values"], ["class_probs_missing"], axes=[2, 3],
                                   keepdims=0))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), b / "vision_gate.onnx")
    (b / "vision_gate.onnx.data").unlink()

    def fix(d):
        d["files"].pop("vision_gate.onnx.data")
        d["graphs"]["vision_gate"].pop("data")
        d["files"]["vision_gate.onnx"] = {"sha256": sha256_file(b / "vision_gate.onnx"),
                                          "size": (b / "vision_gate.onnx").stat().st_size}
    _reseal(b, fix)
    with pytest.raises(BundleError, match="does not emit 'class_probs'"):
        Pipeline.load(b)


def test_verification_cache_is_keyed_on_file_identity(vision_bundle, tmp_path, monkeypatch):
    from safeclip.runtime import manifest as mf
    monkeypatch.setattr(mf, "CACHE_MIN_BYTES", 1)          # cache every file for this test
    b = copy_bundle(vision_bundle, tmp_path / "b")
    assert not any(mf.verify_files(b, load_manifest(b, verify=False).data["files"]).values())
    assert all(mf.verify_files(b, load_manifest(b, verify=False).data["files"]).values())
    # a rewrite (new mtime/size) is rehashed and caught even though the cache knew the old file
    f = b / "vision_gate.onnx.data"
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tampered"):
        mf.verify_files(b, load_manifest(b, verify=False).data["files"])


def test_gate_fails_closed():
    classes, safe = ["neutral", "gun"], ["neutral"]
    assert verdict_from_probs([np.nan, 0.1], classes, safe, 0.6).flagged
    assert verdict_from_probs([0.5], classes, safe, 0.6).flagged           # wrong width
    assert verdict_from_probs(None, classes, safe, 0.6).flagged
    assert not verdict_from_probs([0.9, 0.1], classes, safe, 0.6).flagged
    assert verdict_from_probs([0.3, 0.7], classes, safe, 0.6).flagged
    assert not verdict_from_probs([0.45, 0.55], classes, safe, 0.6).flagged
    assert not verdict_from_probs([0.4, 0.6], classes, safe, 0.6).flagged  # strictly greater


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from safeclip.export import bundle

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "export_vision_gate", boom)
    with pytest.raises(KeyboardInterrupt):
        bundle.export_bundle(bundle.ExportOptions(out=tmp_path / "x", with_decoder=False))
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_bundle_only_when_complete_and_never_a_foreign_folder(vision_bundle, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from safeclip.export import bundle

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(bundle.BundleExistsError):
        bundle.export_bundle(bundle.ExportOptions(out=foreign, with_decoder=False))
    assert (foreign / "keep.txt").read_text() == "mine"

    b = copy_bundle(vision_bundle, tmp_path / "b")
    before = (b / MANIFEST).read_bytes()
    monkeypatch.setattr(bundle, "export_vision_gate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        bundle.export_bundle(bundle.ExportOptions(out=b, with_decoder=False))
    assert (b / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "photos"]


def test_runtime_imports_neither_torch_nor_exporter(vision_bundle, test_images):
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'optimum') or name.startswith('safeclip.export'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from safeclip.runtime.pipeline import Pipeline
v = Pipeline.load({str(vision_bundle)!r}).gate({str(sorted(test_images.iterdir())[0])!r})
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx') or m.startswith('safeclip.export')]
print(v.category, bad)
assert not bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_runtime_rule_agrees_with_the_metrics_oracle():
    """The serving rule (gate.py) and the evaluation rule (metrics.py) are written independently; calibration
    is only meaningful if they decide identically, ties and boundaries included."""
    from safeclip.runtime.metrics import verdict

    rng = np.random.default_rng(0)
    classes, safe = ["neutral", "a", "b", "c"], ["neutral"]
    for _ in range(2000):
        p = rng.dirichlet(np.full(4, rng.uniform(0.1, 3)))
        if rng.random() < 0.1:
            p = np.round(p, 1)                      # ties and exact threshold hits
        t = float(rng.choice([0.0, 0.3, 0.5, 0.6, float(p.max())]))
        a = verdict_from_probs(p, classes, safe, t)
        b = verdict(p, classes, safe, t)
        assert (a.flagged, a.category) == (b[0], b[1])
