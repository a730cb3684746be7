"""The manifest's graph, gate and model sections are written through the typed contract that reads them (runtime/contract.py).

Oracle: a section with every field set (none left at ``None``) goes through ``to_json``, real JSON and
``from_json`` and comes back equal, and its JSON holds one key per field: a field added to ``VisionGraph``,
``DecoderGraph`` or ``KVSpec`` but not written (or not read back) fails here. Exported bundles' sections
round-trip byte for byte in ``test_contract.py``. No torch needed.
"""
import json
from dataclasses import fields

import pytest

from safeclip.runtime.contract import ContractError, DecoderGraph, GateConfig, ModelFacts, VisionGraph
from safeclip.runtime.graph_spec import (KV_FORM, KV_SHARED, DecoderNames, KVSpec, SharedDecoderNames, TensorDecl,
                                         VisionNames, decoder_spec, shared_decoder_spec, vision_spec)

KV = KVSpec(3, 2, 8, "float16", past_key="cache.{i}.k", past_value="cache.{i}.v", present_key="new.{i}.k",
            present_value="new.{i}.v")
DNAMES = DecoderNames("embeds", "mask", "positions", "scores")
VNAMES = VisionNames("px", "feats", "probs")
DSPEC = decoder_spec(64, 100, KV, DNAMES)
VSPEC = vision_spec(336, 576, 64, 5, "float16", VNAMES)

VISION = VisionGraph(file="v.onnx", data="v.onnx.data", precision="float16", names=VNAMES,
                     inputs=VSPEC.inputs_by_name, outputs=VSPEC.outputs_by_name, encoder_layers_computed=23,
                     encoder_layers_total=24, image_newline="image_newline.npy")
DECODER = DecoderGraph(file="d.onnx", data="d.onnx.data", names=DNAMES, inputs=DSPEC.inputs_by_name,
                       outputs=DSPEC.outputs_by_name, kv=KV,
                       quantization={"bits": 4, "block_size": 32, "form": "MatMulNBits", "layers": ["a"]},
                       fusions={"SimplifiedLayerNormalization": 7}, split_weights={"lm_head.weight": [2, 50]})
SNAMES = SharedDecoderNames("embeds", "lens", "total", "scores")
SSPEC = shared_decoder_spec(64, 100, KV, SNAMES)
SHARED = DecoderGraph(file="d.onnx", data="d.onnx.data", names=SNAMES, inputs=SSPEC.inputs_by_name,
                      outputs=SSPEC.outputs_by_name, kv=KV, quantization={"bits": 8, "block_size": 128,
                                                                           "form": "MatMulNBits", "layers": ["a"]},
                      fusions={"GroupQueryAttention": 3}, split_weights={"lm_head.weight": [2, 50]}, kv_form=KV_SHARED)
WRITTEN_INSIDE = {"kv_form": ("kv", "form")}       # DecoderGraph.kv_form is the manifest's graphs.decoder.kv.form


@pytest.mark.parametrize("section", [VISION, DECODER, SHARED], ids=["vision_gate", "decoder", "decoder-shared"])
def test_every_field_is_written_and_read_back(section):
    unset = [f.name for f in fields(section) if getattr(section, f.name) is None]
    assert not unset, f"set {unset} in this test: every field must be written and read back"
    js = json.loads(json.dumps(section.to_json()))
    top = [f.name for f in fields(section) if f.name not in WRITTEN_INSIDE]
    assert list(js) == top                                                  # one key per field, in field order
    for name, (outer, key) in WRITTEN_INSIDE.items():                       # ... or inside the section it belongs to
        if hasattr(section, name):
            assert js[outer][key] == getattr(section, name)
    assert type(section).from_json(js) == section


def test_tensors_and_names_are_written_from_the_typed_objects():
    js = DECODER.to_json()
    assert js["names"] == {"inputs_embeds": "embeds", "attention_mask": "mask", "position_ids": "positions",
                           "logits": "scores"}
    assert list(js["inputs"]) == DSPEC.input_names and list(js["outputs"]) == DSPEC.output_names
    assert js["inputs"]["cache.1.v"] == {"shape": ["batch", 2, "past", 8], "dtype": "float16"}
    assert js["inputs"]["mask"] == {"shape": ["batch", "past+seq"], "dtype": "int64"}


def test_kv_layout_writes_every_field_and_its_form():
    js = KV.to_json()
    assert js["form"] == KV_FORM and list(js)[4] == "form"                 # after dtype, as bundles hold it
    assert set(js) - {"form"} == {f.name for f in fields(KVSpec)}
    assert KVSpec.from_manifest(js) == KV


def test_sections_without_optional_fields_write_none_of_them():
    v = VisionGraph(file="v.onnx", data=None, precision=None, names=VisionNames(), inputs={}, outputs={})
    assert v.to_json() == {"file": "v.onnx", "names": {"pixel_values": "pixel_values",
                                                        "image_features": "image_features",
                                                        "class_probs": "class_probs"},
                           "inputs": {}, "outputs": {}}


@pytest.mark.parametrize("key, value, message", [
    ("precision", 16, "graphs.vision_gate.precision must be a text, got 16"),
    ("encoder_layers_computed", "23", "graphs.vision_gate.encoder_layers_computed must be an int, got '23'"),
    ("encoder_layers_total", True, "graphs.vision_gate.encoder_layers_total must be an int, got True"),
])
def test_bad_optional_fields_are_refused_in_one_line(key, value, message):
    with pytest.raises(ContractError, match=f"^{message}$"):
        VisionGraph.from_json({**VISION.to_json(), key: value})


def test_one_declaration_class_for_spec_and_manifest():
    got = VisionGraph.from_json(VISION.to_json()).inputs["px"]
    assert type(got) is TensorDecl and got == VSPEC.inputs[0] and got.dynamic


GATE = GateConfig(variant="reference", classes=("gun", "neutral", "blood"), safe_classes=("neutral",),
                  threshold=0.4, aggregation="sum", logit_scale=100.0, views="mean", policy="refuse",
                  instruction="Careful: {category}.", refusals={"gun": "No."},
                  descriptors={"name": "default", "version": 1, "sentences": {"gun": ["a gun"]}},
                  history=[{"old_threshold": 0.5, "new_threshold": 0.4}],
                  self_test={"probe_set": "v1", "probes": []})
MODEL = ModelFacts(vocab_size=100, hidden_size=64, num_layers=2, context_length=512, bos_token_id=1,
                   eos_token_ids=(2, 7), pad_token_id=0, image_token_id=99, image_token="<image>",
                   image_seq_length=576)


@pytest.mark.parametrize("section", [GATE, MODEL], ids=["gate", "model"])
def test_gate_and_model_sections_write_every_field_and_read_back(section):
    test_every_field_is_written_and_read_back(section)


def test_gate_written_by_the_exporter_is_the_typed_object(controlled_bundle):
    """An exported bundle's gate and model sections are exactly their typed objects written (nothing written
    beside the contract), and a single-view bundle writes no ``views`` (read as "any")."""
    from safeclip.runtime.manifest import load_manifest

    m = load_manifest(controlled_bundle)
    assert m.gate == json.loads(json.dumps(m.gate_config.to_json()))
    assert m.model == json.loads(json.dumps(m.model_facts.to_json()))
    assert "views" not in m.gate and m.gate_config.view_rule == "any"
