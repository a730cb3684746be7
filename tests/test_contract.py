"""The manifest is the whole contract: the tensor names the runtime binds come from it, bad values refuse to load.

Oracles: a bundle whose graphs' tensors are renamed (in the ONNX files and in the manifest alike) gates and
generates exactly as the original; a manifest naming a tensor its graph lacks, an unknown gate policy or
view mode is refused by ``load_manifest`` with a one-line ``BundleError``; a bundle written before
``names`` existed loads with the default names.
"""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from conftest import copy_bundle  # noqa: E402

from safeclip.runtime.manifest import MANIFEST, BundleError, load_manifest, sha256_file, write_manifest  # noqa: E402
from safeclip.runtime.pipeline import Pipeline  # noqa: E402


def _reseal(bundle, mutate):
    d = json.loads((bundle / MANIFEST).read_text())
    mutate(d)
    write_manifest(bundle, d)


def _rename(bundle, graph: str, renames: dict[str, str]) -> None:
    """Rename tensors of ``graphs[graph]`` in its ONNX file (weights stay external) and in the manifest."""
    d = json.loads((bundle / MANIFEST).read_text())
    entry = d["graphs"][graph]
    path = bundle / entry["file"]
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        vi.name = renames.get(vi.name, vi.name)
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.save(model, str(path))
    d["files"][entry["file"]] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    for io in ("inputs", "outputs"):
        entry[io] = {renames.get(k, k): v for k, v in entry[io].items()}
    entry["names"] = {role: renames.get(n, n) for role, n in entry["names"].items()}
    write_manifest(bundle, d)


def test_vision_names_come_from_the_manifest(vision_bundle, test_images, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _rename(b, "vision_gate", {"pixel_values": "pixels", "image_features": "feats", "class_probs": "gate_probs"})
    m = load_manifest(b)
    assert m.vision.names.pixel_values == "pixels" and m.vision.gate_width == 8
    ref, renamed = Pipeline.load(vision_bundle), Pipeline.load(b)
    for f in sorted(test_images.iterdir())[:2]:
        (fa, va), (fb, vb) = ref.encode(f), renamed.encode(f)
        np.testing.assert_array_equal(fa, fb)
        assert (va.flagged, va.category, va.probs) == (vb.flagged, vb.category, vb.probs)


def test_decoder_names_come_from_the_manifest(controlled_bundle, test_images, tmp_path):
    b = copy_bundle(controlled_bundle, tmp_path / "b")
    _rename(b, "decoder", {"inputs_embeds": "embeds", "attention_mask": "mask", "position_ids": "positions",
                           "logits": "next_logits"})
    assert load_manifest(b).decoder.names.logits == "next_logits"
    clean = test_images / "blue.jpg"
    want = Pipeline.load(controlled_bundle).generate(clean, "What is in the picture?", max_new_tokens=8)
    got = Pipeline.load(b).generate(clean, "What is in the picture?", max_new_tokens=8)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 8


def test_bundles_before_names_use_the_default_names(vision_bundle, test_images, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, lambda d: d["graphs"]["vision_gate"].pop("names"))
    m = load_manifest(b)
    assert (m.vision.names.pixel_values, m.vision.names.class_probs) == ("pixel_values", "class_probs")
    img = sorted(test_images.iterdir())[0]
    assert Pipeline.load(b).gate(img).probs == Pipeline.load(vision_bundle).gate(img).probs


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["gate"].update(policy="shout"), "gate.policy 'shout' is not one of instruct, refuse, annotate"),
    (lambda d: d["gate"].update(views="median"), "gate.views 'median' is not one of any, base, mean"),
    (lambda d: d["gate"].update(refusals={"gun": 3}), "gate.refusals must map categories to texts"),
    (lambda d: d["graphs"]["vision_gate"]["names"].update(pixel_values="pixels"),
     "input 'pixels' named in the manifest is not among the graph's inputs"),
    (lambda d: d["graphs"]["vision_gate"]["names"].update(colour="red"), "unknown roles \\['colour'\\]"),
    (lambda d: d["graphs"]["vision_gate"]["names"].update(class_probs="image_features"),
     "class_probs width differs"),
])
def test_bad_contract_values_refuse_to_load(vision_bundle, tmp_path, mutate, message):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, mutate)
    with pytest.raises(BundleError, match=message) as e:
        load_manifest(b)
    assert "\n" not in str(e.value)
    with pytest.raises(BundleError, match=message):
        Pipeline.load(b)


def test_bad_decoder_contract_refuses_to_load(controlled_bundle, tmp_path):
    b = copy_bundle(controlled_bundle, tmp_path / "b")
    _reseal(b, lambda d: d["graphs"]["decoder"]["kv"].update(past_key="cache.{i}.k"))
    with pytest.raises(BundleError, match="KV tensors cache.0.k, cache.1.k"):
        load_manifest(b)
    _reseal(b, lambda d: (d["graphs"]["decoder"]["kv"].update(past_key="past_key_values.{i}.key"),
                          d["model"].pop("eos_token_ids")))
    with pytest.raises(BundleError, match="'model' lacks eos_token_ids"):
        load_manifest(b)


def test_decoder_of_the_old_kv_form_is_refused_with_one_line(controlled_bundle, tmp_path):
    """A decoder exported before the one-arena runtime (present = past + new, no kv.form): re-export."""
    b = copy_bundle(controlled_bundle, tmp_path / "b")
    assert load_manifest(b).data["graphs"]["decoder"]["kv"]["form"] == "shared"      # the cpu target's
    _reseal(b, lambda d: d["graphs"]["decoder"]["kv"].pop("form"))
    with pytest.raises(BundleError, match="returns past\\+new KV .*re-export the bundle with safeclip-export") as e:
        Pipeline.load(b)
    assert "\n" not in str(e.value)


def test_exported_graph_sections_are_their_typed_objects_written(controlled_bundle):
    """The exporter writes graphs.* through VisionGraph/DecoderGraph.to_json: reading a bundle's section and
    writing it again gives the same JSON, key order included (test_manifest_sections.py: every field)."""
    from safeclip.runtime.contract import DecoderGraph, VisionGraph

    m = load_manifest(controlled_bundle)
    for cls, key in ((VisionGraph, "vision_gate"), (DecoderGraph, "decoder")):
        raw = m.graphs[key]
        typed = cls.from_json(raw)
        assert json.dumps(typed.to_json()) == json.dumps(raw), key
        assert cls.from_json(typed.to_json()) == typed


def test_graph_specs_are_what_the_bundle_declares_and_the_graphs_take(demo_bundle_traced):
    """The manifest's I/O sections, the ONNX graphs' positional I/O and the TensorRT profiles all come from
    one spec per graph (runtime/graph_spec.py); the traced decoder (KV form "new", what TensorRT targets write:
    the cpu target's fused one is checked in test_fused_decoder.py)."""
    controlled_bundle = demo_bundle_traced
    import onnxruntime as ort

    from safeclip.export.targets import TARGETS
    from safeclip.runtime.graph_spec import decoder_spec, vision_spec

    m = load_manifest(controlled_bundle)
    dec, vis = m.decoder, m.vision
    hidden = dec.inputs[dec.names.inputs_embeds].shape[-1]
    dspec = decoder_spec(hidden, dec.outputs[dec.names.logits].shape[-1], dec.kv, dec.names)
    assert (dec.inputs, dec.outputs) == (dspec.inputs_by_name, dspec.outputs_by_name)
    feats = vis.outputs[vis.names.image_features].shape
    vspec = vision_spec(vis.inputs[vis.names.pixel_values].shape[-1], feats[1], feats[2], vis.gate_width,
                        vis.outputs[vis.names.image_features].dtype, vis.names)
    assert (vis.inputs, vis.outputs) == (vspec.inputs_by_name, vspec.outputs_by_name)
    for spec, f in ((dspec, dec.file), (vspec, vis.file)):
        s = ort.InferenceSession(str(m.path(f)), providers=["CPUExecutionProvider"])
        assert [i.name for i in s.get_inputs()] == spec.input_names
        assert [o.name for o in s.get_outputs()] == spec.output_names
    axes = dspec.dynamic_axes(lambda s: s, "free")
    assert axes[dec.names.attention_mask] == {0: "batch", 1: "free"} and axes[dec.kv.past_key.format(i=0)] == \
        {0: "batch", 2: "past"}
    pre, step, ext, *_ = TARGETS["jetson"].decoder_profiles(hidden, dec.kv.num_layers, dec.kv.num_kv_heads,
                                                        dec.kv.head_dim, 2048)
    assert set(pre) == set(dspec.input_names) == set(ext)
    assert step[dec.names.attention_mask] == {"min": [1, 1], "opt": [1, 1025], "max": [4, 2049]}   # bucket + 1, B 1..4
    assert ext[dec.names.attention_mask] == {"min": [1, 3], "opt": [1, 1088], "max": [1, 2048 + 512]}
