"""TensorRT parser compatibility check: one small graph per rule, a clean one, and a real dynamo export."""
from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from safeclip.export.trt_check import (  # noqa: E402
    Issue, TensorRTCompatibilityError, assert_tensorrt_compatible, check_onnx_for_tensorrt, list_versions, load_ops)

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, inits=(), opset=18, functions=(), extra_opsets=()):
    g = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(g, opset_imports=ops, functions=list(functions))


def vi(name, t=F, shape=(2, 4)):
    return helper.make_tensor_value_info(name, t, list(shape))


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def problems(m, ops=None):
    return [i.problem for i in check_onnx_for_tensorrt(m, ops)]


def clean_model():
    # x: [2, 4] -> MatMul w [4, 4] -> Add b -> Softmax -> ReduceMean over axis 1 (initializer) -> [2]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
             helper.make_node("Softmax", ["h2"], ["p"], name="sm", axis=-1),
             helper.make_node("ReduceMean", ["p", "ax"], ["y"], name="mean", keepdims=0)]
    inits = [const("w", np.eye(4), np.float32), const("b", np.zeros(4), np.float32), const("ax", [1])]
    return model(nodes, [vi("x")], [vi("y", shape=(2,))], inits)


def test_op_list_data_is_sourced_and_complete():
    data = json.loads(resources.files("safeclip.export").joinpath("trt_ops.json").read_text())
    assert data["source"]["repository"] == "onnx/onnx-tensorrt"
    assert list_versions() == ["10.8", "11.0"]
    for v, entry in data["versions"].items():
        assert len(entry["commit"]) == 40 and entry["header"].startswith(f"TensorRT {v} supports")
        ops = entry["operators"]
        assert len(ops) > 190
        assert ops["MatMul"]["supported"] and not ops["Multinomial"]["supported"]
        assert "3840" in ops["TopK"]["restrictions"]
        assert ops["DequantizeLinear"]["restrictions"] == "`x_zero_point` must be zero"
    assert "Attention" in data["versions"]["11.0"]["operators"]
    assert "Attention" not in data["versions"]["10.8"]["operators"]


def test_load_ops_picks_the_list_for_the_target():
    assert load_ops().version == "10.8" and load_ops().target == "10.3"
    assert load_ops("10.16").version == "10.8"
    assert load_ops("11.4").version == "11.0"
    with pytest.raises(ValueError, match="stored: 10.8, 11.0"):
        load_ops(version="9.9")


def test_clean_graph_has_no_issues(tmp_path):
    m = clean_model()
    assert check_onnx_for_tensorrt(m) == []
    assert check_onnx_for_tensorrt(m, "11.4") == []
    onnx.save(m, tmp_path / "clean.onnx")
    assert_tensorrt_compatible(tmp_path / "clean.onnx")


def test_unsupported_and_unknown_ops():
    nodes = [helper.make_node("Multinomial", ["x"], ["s"], name="sample", sample_size=1),
             helper.make_node("FancyOp", ["x"], ["z"], name="fancy")]
    issues = check_onnx_for_tensorrt(model(nodes, [vi("x")], [vi("s", I64), vi("z")]))
    assert [(i.node, i.op_type) for i in issues] == [("sample", "Multinomial"), ("fancy", "FancyOp")]
    assert "sampling must stay outside the graph" in issues[0].problem
    assert "not in TensorRT 10.8's ONNX operator list" in issues[1].problem


def test_custom_domain_flagged_but_local_function_body_checked():
    custom = helper.make_node("FastGelu", ["x"], ["y"], name="fg", domain="com.microsoft")
    m = model([custom], [vi("x")], [vi("y")], extra_opsets=[("com.microsoft", 1)])
    assert problems(m) == ["custom domain 'com.microsoft': the TensorRT parser needs a plugin named 'FastGelu' for it"]

    def fn(body_op):
        body = [helper.make_node(body_op, ["a"], ["b"], name="inner")]
        return helper.make_function("local", "Act", ["a"], ["b"], body, [helper.make_opsetid("", 18)])

    call = helper.make_node("Act", ["x"], ["y"], name="act", domain="local")
    ok = model([call], [vi("x")], [vi("y")], functions=[fn("Relu")], extra_opsets=[("local", 1)])
    assert check_onnx_for_tensorrt(ok) == []
    bad = model([call], [vi("x")], [vi("y")], functions=[fn("Multinomial")], extra_opsets=[("local", 1)])
    assert [i.node for i in check_onnx_for_tensorrt(bad)] == ["act/inner"]


def test_reduce_axes_must_be_initializer_or_constant():
    def reduce_with(axes_nodes, inputs=()):
        nodes = [*axes_nodes, helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="rs", keepdims=0)]
        return model(nodes, [vi("x"), *inputs], [vi("y", shape=(2,))])

    from_input = reduce_with([], [vi("ax", I64, (1,))])
    assert problems(from_input) == ["input `axes` ('ax') must be an initializer or Constant"]
    from_constant = reduce_with([helper.make_node("Constant", [], ["ax"], value=const("v", [1]))])
    assert check_onnx_for_tensorrt(from_constant) == []
    computed = reduce_with([helper.make_node("Constant", [], ["c"], value=const("v", [1], np.int32)),
                            helper.make_node("Cast", ["c"], ["ax"], to=I64)])
    assert problems(computed, "11.4") == ["input `axes` ('ax') must be an initializer or Constant"]


def test_squeeze_axes_constant_and_resolvable_from_10_7():
    nodes = [helper.make_node("Constant", [], ["c"], value=const("v", [0], np.int32)),
             helper.make_node("Cast", ["c"], ["ax"], to=I64),
             helper.make_node("Unsqueeze", ["x", "ax"], ["y"], name="unsq")]
    computed = model(nodes, [vi("x")], [vi("y", shape=(1, 2, 4))])
    assert problems(computed, "10.3") == ["input `axes` ('ax') must be an initializer or Constant before TensorRT 10.7"]
    assert check_onnx_for_tensorrt(computed, "11.4") == []
    dynamic = model([helper.make_node("Squeeze", ["x", "ax"], ["y"], name="sq")],
                    [vi("x", shape=(1, 4)), vi("ax", I64, (1,))], [vi("y", shape=(4,))])
    assert problems(dynamic, "11.4") == ["input `axes` ('ax') must be resolvable to a constant"]
    assert len(problems(dynamic, "10.3")) == 1


def test_slice_tensor_axes_from_10_3_and_dynamic_bounds_always_allowed():
    # starts/ends computed from the input's shape (a decoder slicing to the current length)
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["n"], name="len", axis=0),
             helper.make_node("Sub", ["n", "one"], ["end"], name="end"),
             helper.make_node("Slice", ["x", "zero", "end", "axes"], ["y"], name="slice")]
    x = helper.make_tensor_value_info("x", F, [2, "T"])
    inits = [const("zero", [0]), const("one", [1])]
    dyn_axes = model(nodes, [x, vi("axes", I64, (1,))], [helper.make_tensor_value_info("y", F, [2, "U"])], inits)
    assert check_onnx_for_tensorrt(dyn_axes, "10.3") == []
    assert problems(dyn_axes, load_ops("10.2")) == [
        "input `axes` ('axes') must be an initializer or Constant before TensorRT 10.3"]
    const_axes = model(nodes, [x], [helper.make_tensor_value_info("y", F, [2, "U"])], [*inits, const("axes", [1])])
    assert check_onnx_for_tensorrt(const_axes, load_ops("10.2")) == []


def test_topk_k_limit_and_sorted():
    def topk(k_init=None, sorted_=1, k_input=False):
        node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=sorted_)
        inputs = [vi("x", shape=(1, 5000))] + ([vi("k", I64, (1,))] if k_input else [])
        inits = [const("k", [k_init])] if k_init is not None else []
        return model([node], inputs, [vi("v", shape=(1, "k")), vi("i", I64, (1, "k"))], inits)

    assert check_onnx_for_tensorrt(topk(50)) == []
    assert problems(topk(3840)) == ["K=3840 must be less than 3840"]
    assert problems(topk(50, sorted_=0)) == ["`sorted` must be 1"]
    assert check_onnx_for_tensorrt(topk(k_input=True)) == []   # dynamic K: parser accepts it since 8.6


@pytest.mark.parametrize("op,zp_name", [("QuantizeLinear", "y_zero_point"), ("DequantizeLinear", "x_zero_point")])
def test_qdq_zero_points_must_be_zero(op, zp_name, tmp_path):
    src_t = TensorProto.FLOAT if op == "QuantizeLinear" else TensorProto.INT8
    dst_t = TensorProto.INT8 if op == "QuantizeLinear" else TensorProto.FLOAT

    def qdq(zp):
        node = helper.make_node(op, ["x", "scale", "zp"], ["y"], name="q")
        inits = [const("scale", 0.1, np.float32), const("zp", zp, np.int8)]
        return model([node], [vi("x", src_t)], [vi("y", dst_t)], inits)

    assert check_onnx_for_tensorrt(qdq(0)) == []
    assert problems(qdq(3)) == [f"`{zp_name}` must be zero (only symmetric quantization)"]
    # zero points stored outside the graph file are read alone from the .data file
    for zp, expect in ((0, []), (5, [f"`{zp_name}` must be zero (only symmetric quantization)"])):
        m = qdq(zp)
        path = tmp_path / f"qdq{zp}.onnx"
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
                  size_threshold=0)
        assert onnx.load(path, load_external_data=False).graph.initializer[1].data_location == TensorProto.EXTERNAL
        assert problems(str(path)) == expect


def test_attention_past_kv_and_opset_range():
    q = helper.make_tensor_value_info("q", F, [1, 2, 3, 4])
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"], name="attn")
    ins = [q, *(helper.make_tensor_value_info(n, F, [1, 2, 3, 4]) for n in ("k", "v", "pk", "pv"))]
    outs = [helper.make_tensor_value_info(n, F, None) for n in ("y", "present_k", "present_v")]
    m = model([node], ins, outs, opset=23)
    got = problems(m, "11.4")
    assert got == ["input `past_key` is unsupported by the TensorRT parser",
                   "input `past_value` is unsupported by the TensorRT parser",
                   "output `present_key` is unsupported by the TensorRT parser",
                   "output `present_value` is unsupported by the TensorRT parser"]
    plain = model([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")], ins[:3], outs[:1], opset=23)
    assert check_onnx_for_tensorrt(plain, "11.4") == []
    assert problems(plain, "10.3") == ["opset 23 is outside TensorRT 10.8's parser range 9-22",
                                       "not in TensorRT 10.8's ONNX operator list"]
    assert problems(model([], [vi("x")], [vi("x")], opset=25), "11.4") == [
        "opset 25 is outside TensorRT 11.0's parser range 9-24"]


def test_subgraphs_are_checked():
    then_g = helper.make_graph([helper.make_node("Multinomial", ["x"], ["s"], name="inner_sample")], "then",
                               [], [vi("s", I64, (2, 1))])
    else_g = helper.make_graph([helper.make_node("ArgMax", ["x"], ["s"], name="inner_argmax", keepdims=1, axis=1)],
                               "else", [], [vi("s", I64, (2, 1))])
    node = helper.make_node("If", ["c"], ["s"], name="choose", then_branch=then_g, else_branch=else_g)
    m = model([node], [vi("x"), vi("c", TensorProto.BOOL, ())], [vi("s", I64, (2, 1))])
    assert [i.node for i in check_onnx_for_tensorrt(m)] == ["choose/inner_sample"]


def test_element_types_layernorm_outputs_and_newer_ops():
    floor = model([helper.make_node("Floor", ["x"], ["y"], name="floor")], [vi("x", I64)], [vi("y", I64)])
    assert problems(floor) == ["tensor 'x' is INT64; TensorRT 10.8 lists FP32, FP16, BF16 for Floor"]
    as_double = model([helper.make_node("Floor", ["x"], ["y"], name="floor")], [vi("x", TensorProto.DOUBLE)],
                      [vi("y", TensorProto.DOUBLE)])
    assert check_onnx_for_tensorrt(as_double) == []   # the parser casts DOUBLE down to FLOAT
    ln = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln", axis=-1)
    ln_model = model([ln], [vi("x")], [vi("y"), vi("mean", shape=(2, 1))], [const("g", np.ones(4), np.float32)])
    assert problems(ln_model) == ["only the first output `Y` is supported"]
    stft = helper.make_node("STFT", ["sig", "step"], ["out"], name="stft")
    m = model([stft], [helper.make_tensor_value_info("sig", F, [1, 64, 1])],
              [helper.make_tensor_value_info("out", F, None)], [const("step", 8)])
    assert problems(m, "10.3") == ["parser support added in TensorRT 10.5; target is 10.3"]
    assert check_onnx_for_tensorrt(m, "10.8") == []


def test_assert_raises_one_line_listing_every_problem(tmp_path):
    nodes = [helper.make_node("Multinomial", ["x"], ["s"], name="sample"),
             helper.make_node("ReduceMax", ["x", "ax"], ["m"], name="rmax")]
    m = model(nodes, [vi("x"), vi("ax", I64, (1,))], [vi("s", I64), vi("m", shape=(2,))])
    path = tmp_path / "bad.onnx"
    onnx.save(m, path)
    with pytest.raises(TensorRTCompatibilityError) as e:
        assert_tensorrt_compatible(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad.onnx: 2 TensorRT parser problem(s): ")
    assert "sample (Multinomial)" in msg and "rmax (ReduceMax): input `axes`" in msg
    assert isinstance(check_onnx_for_tensorrt(path)[0], Issue)
    with pytest.raises(FileNotFoundError):
        check_onnx_for_tensorrt(tmp_path / "missing.onnx")


# -- a real export: torch.onnx dynamo, opset 18, through the project's single export entry point ---------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from safeclip.export.onnx import onnx_from_module

    class Block(torch.nn.Module):
        """Embedding, LayerNorm, attention (MatMul, Softmax), GELU MLP, a last-token Gather, a fixed-axis
        Slice, a mean and a length-dependent slice as a decoder does."""

        def __init__(self, d=32, heads=4, vocab=50):
            super().__init__()
            self.emb, self.ln = torch.nn.Embedding(vocab, d), torch.nn.LayerNorm(d)
            self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.ff = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
            self.heads = heads

        def forward(self, ids):
            x = self.emb(ids)                                   # [B, T, D]
            b, t, d = x.shape
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                       for z in self.qkv(self.ln(x)).split(d, dim=-1))      # [B, H, T, D/H]
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            x = x + self.ff(self.ln(x))
            prev = x[:, : t - 1].mean(dim=1)                    # [B, D], Slice with a shape-derived end
            return x[:, -1, :] + prev, x[:, :, :8].mean(dim=-1).unsqueeze(-1)   # [B, D], [B, T, 1]

    class DecodeStep(torch.nn.Module):
        """A key/value cache grown by concatenation, a causal mask offset by the cache length, and greedy /
        top-k picks of the last position."""

        def forward(self, x, past):                         # x: [B, T, D], past: [B, P, D]
            kv = torch.cat([past, x], dim=1)                # [B, P+T, D]
            t, s = x.shape[1], kv.shape[1]
            mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
            att = (x @ kv.transpose(1, 2)).masked_fill(~mask, float("-inf")).softmax(-1) @ kv
            return att[:, -1].argmax(-1), torch.topk(att[:, -1], 5).indices, kv

    torch.manual_seed(0)
    block = Block().eval()
    ids = torch.randint(0, 50, (2, 7))
    root = tmp_path_factory.mktemp("trt_check_export")
    dims = {"ids": {0: torch.export.Dim("batch", max=8), 1: torch.export.Dim("seq", min=2, max=64)}}
    out = {}
    for name, module, dyn in (("static", block, None), ("dynamic", block, dims), ("half", Block().eval().half(), dims)):
        path = root / f"{name}.onnx"
        onnx_from_module(module, (ids,), path, ["ids"], ["last", "mean"], dynamic_shapes=dyn)
        out[name] = path
    x, past = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    out["decode"] = root / "decode.onnx"
    steps = {"x": {1: torch.export.Dim("t", max=64)}, "past": {1: torch.export.Dim("p", max=128)}}
    onnx_from_module(DecodeStep(), (x, past), out["decode"], ["x", "past"], ["next", "top", "kv"], dynamic_shapes=steps)
    return out


EXPECTED_OPS = {"static": {"LayerNormalization", "MatMul", "Softmax", "Erf", "Gather", "Slice", "ReduceMean"},
                "decode": {"Concat", "Trilu", "Where", "Softmax", "ArgMax", "TopK"}}


@pytest.mark.parametrize("which", ["static", "dynamic", "half", "decode"])
@pytest.mark.parametrize("target", ["10.3", "11.4"])
def test_dynamo_export_is_tensorrt_clean(exported, which, target):
    m = onnx.load(exported[which], load_external_data=False)
    assert EXPECTED_OPS.get(which, EXPECTED_OPS["static"]) <= {n.op_type for n in m.graph.node}
    if which == "half":
        assert {t.data_type for t in m.graph.initializer if t.name.endswith("weight")} == {TensorProto.FLOAT16}
    assert check_onnx_for_tensorrt(exported[which], target) == []


def test_checker_is_not_vacuous_on_the_export(exported):
    m = onnx.load(exported["dynamic"], load_external_data=False)
    reduce = next(n for n in m.graph.node if n.op_type == "ReduceMean")
    reduce.input[1] = "axes_in"                     # the axes now come from a graph input
    m.graph.input.append(helper.make_tensor_value_info("axes_in", I64, [1]))
    got = check_onnx_for_tensorrt(m)
    assert [(i.op_type, i.problem) for i in got] == [
        ("ReduceMean", "input `axes` ('axes_in') must be an initializer or Constant")]
