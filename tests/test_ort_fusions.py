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


def test_cpu_bundle_decoder_has_every_norm_fused(demo_bundle_traced):
    """A cpu bundle with the traced decoder (``fused_ops=False``): 2 norms per layer + the final one, no traced
    RMSNorm pieces left, recorded in the manifest; the export's parity gate ran on this graph."""
    import json

    dec = json.loads((demo_bundle_traced / "manifest.json").read_text())["graphs"]["decoder"]
    layers = dec["kv"]["num_layers"]
    ops = [n.op_type for n in onnx.load(str(demo_bundle_traced / dec["file"]), load_external_data=False).graph.node]
    assert ops.count(RMS_NORM_OP) == 2 * layers + 1 == dec["fusions"][RMS_NORM_OP]
    assert "Reciprocal" not in ops and "Pow" not in ops and "Sqrt" not in ops


def _float_matmul_weights(path):
    """{initializer name: bytes} of every MatMul weight that is an initializer, and the graph's nodes."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    sizes = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            t = inits[n.input[1]]
            sizes[t.name] = int(np.prod(t.dims)) * 4
    return sizes, list(g.node)


def test_wide_weights_split_into_column_chunks_compute_the_same(demo_sources, tmp_path):
    """A cpu decoder whose float MatMul weights exceed ``split_max_bytes`` holds them as column chunks (each
    at most that size) joined by a Concat; it passes the exporter's parity gate and gives the outputs of the
    unsplit graph. The default threshold (64 MiB) leaves the demo's small weights whole."""
    from safeclip.export.decoder import export_decoder
    from safeclip.export.ort_fusions import SPLIT_MAX_BYTES

    cfg = demo_sources.llava.config.text_config
    limit = 20000                                        # lm_head [64, 261] and gate/up [64, 160] fp32 exceed it
    frags = {name: export_decoder(demo_sources.llava, tmp_path / name, dtype="float32", ort_fusions=True,
                                  split_max_bytes=mb)
             for name, mb in (("whole", SPLIT_MAX_BYTES), ("split", limit))}
    assert "split_weights" not in frags["whole"]["graphs"]["decoder"]
    assert cfg.vocab_size * cfg.hidden_size * 4 < SPLIT_MAX_BYTES
    split = frags["split"]["graphs"]["decoder"]["split_weights"]
    layers = cfg.num_hidden_layers
    # 64 fp32 rows: 20000 bytes hold 78 columns, 64 on the 64-column grid: 261 -> 4 x 64 + 5, 160 -> 64 + 64 + 32
    assert split["lm_head.weight"] == 5 and {v for k, v in split.items() if k != "lm_head.weight"} == {3}
    assert sorted(k.rsplit(".", 2)[-2] for k in split) == sorted(["gate_proj", "up_proj"] * layers + ["lm_head"])
    sizes, nodes = _float_matmul_weights(tmp_path / "split" / "decoder.onnx")
    # down_proj [160, 64]: its 64 columns are one grid step, so it stays whole
    assert all(v <= limit for k, v in sizes.items() if "down_proj" not in k)
    whole_sizes, whole_nodes = _float_matmul_weights(tmp_path / "whole" / "decoder.onnx")
    assert sum(sizes.values()) == sum(whole_sizes.values())            # the same weights, cut into columns
    cats = [n for n in nodes if n.op_type == "Concat" and n.name.endswith("_concat")]
    assert len(cats) == len(split) and sum(len(n.input) for n in cats) == sum(split.values())
    for frag in frags.values():                                          # the parity gate ran and passed
        assert all(r.max_abs_err["logits"] <= r.atol["logits"] for r in frag["parity"])
    from _lm_models import prefill_feeds

    feeds = prefill_feeds(cfg)
    outs = {name: ort.InferenceSession(str(tmp_path / name / "decoder.onnx"),
                                       providers=["CPUExecutionProvider"]).run(None, feeds) for name in frags}
    for a, b in zip(outs["split"], outs["whole"]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6 * max(1.0, float(np.abs(b).max()))


def test_quantised_weights_are_not_split(demo_sources, tmp_path):
    """Only float weights are split: a quantised lm_head (MatMulNBits) stays one node."""
    from safeclip.export.decoder import export_decoder
    from safeclip.export.quant import scheme_for
    from safeclip.export.targets import target

    sch = scheme_for("int4", target("cpu"), lm_head=True)
    frag = export_decoder(demo_sources.llava, tmp_path, dtype="float32", quant=sch, ort_fusions=True,
                          split_max_bytes=1000)
    assert "split_weights" not in frag["graphs"]["decoder"]
    sizes, nodes = _float_matmul_weights(tmp_path / "decoder.onnx")
    assert sizes == {} and not [n for n in nodes if n.name.endswith("_concat")]


def test_split_at_tinyllama_lm_head_geometry():
    """[2048, 32000] fp32 (262 MB) at the default 64 MiB: four chunks of 8192, 8192, 8192 and 7424 columns whose
    arrays, put side by side, are the weight; a Concat in the MatMul's place keeps the graph output's name."""
    torch = pytest.importorskip("torch")
    from safeclip.export.ort_fusions import split_wide_weights

    x = ir.Value(name="x", shape=ir.Shape([1, 1, 2048]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([2048, 32000]), type=ir.TensorType(ir.DataType.FLOAT))
    mm = ir.Node("", "MatMul", [x, w], name="lm_head")
    mm.outputs[0].name = "logits"
    model = ir.Model(ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 18}),
                     ir_version=10)
    weight = torch.randn(2048, 32000)
    jobs, split = split_wide_weights(model, {"w": (w, "lm_head.weight", None)},
                                     lambda name: weight if name == "lm_head.weight" else None)
    assert split == {"lm_head.weight": 4} and "w" not in model.graph.initializers
    assert [int(v[0].shape[1]) for v in jobs.values()] == [8192, 8192, 8192, 7424]
    assert np.array_equal(np.concatenate([produce() for _, produce, _ in jobs.values()], axis=1), weight.numpy())
    (out,) = model.graph.outputs
    assert out.name == "logits" and out.producer().op_type == "Concat"
    assert [n.op_type for n in model.graph] == ["MatMul"] * 4 + ["Concat"]
