"""The demo bundle's exported graphs (cpu: fp32, jetson: fp16 with fp32 islands) pass the static check against
TensorRT's ONNX parser operator lists for TensorRT 10.3 (JetPack 6) and 11.4 (JetPack 7.2.2).

The cpu bundle is the session's ``demo_bundle``; the jetson bundle is exported once for this module.
"""
from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from safeclip.export.trt_check import check_onnx_for_tensorrt  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, demo_bundle, cache_dir):
    from safeclip.export.bundle import ExportOptions, export_bundle
    out = tmp_path_factory.mktemp("trt_graphs") / "demo-jetson"
    jetson = export_bundle(ExportOptions(model="demo", out=out, target="jetson", max_batch=6)).bundle
    return {"cpu": demo_bundle, "jetson": jetson}


@pytest.mark.parametrize("target", ["cpu", "jetson"])
@pytest.mark.parametrize("graph", ["vision_gate", "decoder"])
@pytest.mark.parametrize("trt_version", ["10.3", "11.4"])
def test_exported_graphs_pass_the_tensorrt_parser_check(bundles, target, graph, trt_version):
    path = bundles[target] / f"{graph}.onnx"
    m = onnx.load(path, load_external_data=False)
    ops = {n.op_type for n in m.graph.node} | {n.op_type for f in m.functions for n in f.node}
    fused = target == "cpu" and graph == "decoder"                        # attention inside GroupQueryAttention
    assert {"MatMul", "GroupQueryAttention" if fused else "Softmax"} <= ops  # a real transformer graph was checked
    half, single = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    weights = {t.data_type for t in m.graph.initializer if len(t.dims) == 2 and t.data_type in (half, single)}
    assert half in weights if target == "jetson" else weights == {single}
    issues = check_onnx_for_tensorrt(path, trt_version)
    if fused:
        # the cpu target's form: ONNX Runtime's fused contrib operators (export/fused_decoder.py), which the parser
        # check refuses, one issue per node; nothing else in the graph is TensorRT-incompatible
        decoder = json.loads((bundles[target] / "manifest.json").read_text())["graphs"]["decoder"]
        layers = decoder["kv"]["num_layers"]
        assert sorted(i.op_type for i in issues) == sorted(
            ["GroupQueryAttention"] * layers + ["SkipSimplifiedLayerNormalization"] * 2 * layers
            + ["SimplifiedLayerNormalization"])
    else:
        assert issues == []


def test_the_manifest_plans_the_decode_profile_export_was_given(bundles):
    from safeclip.runtime.backends.trt_plan import plan_batch
    from safeclip.runtime.manifest import load_manifest

    m = load_manifest(bundles["jetson"])
    plan = m.build_plan["decoder"]
    assert plan["profile_names"] == ["prefill", "decode", "extend"]
    kv, hidden = m.decoder.kv, m.decoder.inputs[m.decoder.names.inputs_embeds].shape[-1]
    assert plan_batch(plan["profiles"], kv, hidden, m.build["context"]) == 6       # --max-batch 6
