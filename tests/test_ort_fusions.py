"""RMSNorm -> ONNX Runtime's SimplifiedLayerNormalization (export/ort_fusions.py): what it fuses, what it
leaves, and that the fused graph computes the same numbers (ONNX Runtime, against a numpy RMSNorm)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from safeclip.export.ort_fusions import RMS_NORM_OP, fuse_rms_norm  # noqa: E402

D, EPS = 16, 1e-6


def _norm_graph(exponent=2.0, axes=-1, weight="w", extra_use=False, weight_is_input=False):
    """y = weight * (x * 1/sqrt(mean(x^2, axes) + eps)), written the way torch.onnx writes LlamaRMSNorm, then
    z = y @ m (so the norm's output feeds a real consumer)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
             numpy_helper.from_array(np.array([axes], np.int64), "axes"),
             numpy_helper.from_array(np.array(EPS, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal((D, 4)).astype(np.float32), "m")]
    if not weight_is_input:
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, D).astype(np.float32), "w"))
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["r"], keepdims=1),
             helper.make_node("Add", ["r", "eps"], ["a"]),
             helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["rs"]),
             helper.make_node("Mul", ["x", "rs"], ["n"]),
             helper.make_node("Mul", [weight, "n"], ["y"]),
             helper.make_node("MatMul", ["y", "m"], ["z"])]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 4])]
    if extra_use:                                      # the reciprocal is also a graph output: not fusable
        outputs.append(helper.make_tensor_value_info("rs", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, D])]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [D]))
    g = helper.make_graph(nodes, "rms", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL    # the graph as written
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _fused(proto):
    model = ir.serde.deserialize_model(proto)
    n = fuse_rms_norm(model)
    return n, ir.serde.serialize_model(model)


def test_llama_rmsnorm_becomes_one_node_with_the_same_output():
    proto = _norm_graph()
    n, fused = _fused(proto)
    assert n == 1
    ops = [node.op_type for node in fused.graph.node]
    assert ops == [RMS_NORM_OP, "MatMul"]
    node = fused.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and attrs["stash_type"] == 1 and attrs["epsilon"] == pytest.approx(EPS)
    assert {t.name for t in fused.graph.initializer} == {"w", "m"}          # exponent, axes, eps dropped
    x = np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float32) * 3
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    m = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "m"))
    x64 = x.astype(np.float64)
    want = (w * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + EPS)) @ m
    got_ref, = _run(proto, {"x": x})
    got, = _run(fused, {"x": x})
    assert np.abs(got_ref - want).max() < 1e-5 * np.abs(want).max()          # the unfused graph is right...
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()              # ...and so is the fused one


@pytest.mark.parametrize("variant", [dict(exponent=3.0), dict(axes=0), dict(extra_use=True),
                                     dict(weight_is_input=True)],
                         ids=["cube", "first-axis", "reciprocal-used-elsewhere", "weight-not-an-initializer"])
def test_what_is_not_an_rmsnorm_is_left_alone(variant):
    proto = _norm_graph(**variant)
    n, fused = _fused(proto)
    assert n == 0
    assert [node.op_type for node in fused.graph.node] == [node.op_type for node in proto.graph.node]
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, D)).astype(np.float32)}
    if variant.get("weight_is_input"):
        feeds["w"] = np.ones(D, np.float32)
    for a, b in zip(_run(proto, feeds), _run(fused, feeds)):
        np.testing.assert_array_equal(a, b)


def test_cpu_bundle_decoder_has_every_norm_fused(demo_bundle):
    """The cpu target's decoder (the session's demo bundle): 2 norms per layer + the final one, no traced
    RMSNorm pieces left, recorded in the manifest; the export's parity gate ran on this graph."""
    import json

    dec = json.loads((demo_bundle / "manifest.json").read_text())["graphs"]["decoder"]
    layers = dec["kv"]["num_layers"]
    ops = [n.op_type for n in onnx.load(str(demo_bundle / dec["file"]), load_external_data=False).graph.node]
    assert ops.count(RMS_NORM_OP) == 2 * layers + 1 == dec["fusions"][RMS_NORM_OP]
    assert "Reciprocal" not in ops and "Pow" not in ops and "Sqrt" not in ops
