"""int8 / int4 weight-only decoders (export/quant.py): packing, parity, manifest, runtime, TensorRT form, bad input.

Oracles: ONNX Runtime's own kernels on one-node graphs for the dequantisation formula; transformers'
``generate`` on the demo model whose linear weights are replaced by the dequantised ones for the runtime's
greedy tokens; the parity gate for whole graphs.
"""
from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safeclip.export.quant import (DQ, MATMULNBITS, QuantError, QuantScheme, dequantize, quantize,  # noqa: E402
                                   scheme_for)
from safeclip.export.targets import target  # noqa: E402

N = 16


def _one_node(scheme: QuantScheme, arrays: dict, k: int, n: int):
    """A graph computing x @ W from the packed arrays with the scheme's operator (MatMulNBits or DQ + MatMul)."""
    from onnx import TensorProto, helper, numpy_helper

    fdt = TensorProto.FLOAT16 if scheme.scale_dtype == "float16" else TensorProto.FLOAT
    inits = [numpy_helper.from_array(arrays["scales"], "S")]
    if scheme.form == MATMULNBITS:
        inits.append(numpy_helper.from_array(arrays["packed"], "B"))
        ins = ["x", "B", "S"] + (["Z"] if "zero_points" in arrays else [])
        if "zero_points" in arrays:
            inits.append(numpy_helper.from_array(arrays["zero_points"], "Z"))
        nodes = [helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=scheme.bits,
                                  block_size=scheme.block_size)]
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    else:
        qtype = TensorProto.INT4 if scheme.bits == 4 else TensorProto.INT8
        inits.append(helper.make_tensor("B", qtype, [k, n], arrays["packed"].tobytes(), raw=True))
        attrs = {"axis": 0, "block_size": scheme.block_size} if scheme.bits == 4 else {"axis": 1}
        nodes = [helper.make_node("DequantizeLinear", ["B", "S"], ["w"], **attrs),
                 helper.make_node("MatMul", ["x", "w"], ["y"])]
        opsets = [helper.make_opsetid("", 21)]
    outs = [helper.make_tensor_value_info("y", fdt, [3, n])]
    if scheme.form == DQ:                                               # the dequantised weight itself
        outs.append(helper.make_tensor_value_info("w", fdt, [k, n]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", fdt, [3, k])], outs, inits)
    return helper.make_model(g, opset_imports=opsets)


@pytest.mark.parametrize("form,bits,symmetric", [(MATMULNBITS, 4, True), (MATMULNBITS, 4, False),
                                                 (MATMULNBITS, 8, True), (MATMULNBITS, 8, False),
                                                 (DQ, 4, True), (DQ, 8, True)])
def test_dequantize_is_what_onnxruntime_computes(form, bits, symmetric):
    import onnxruntime as ort

    k, n = 96, 40
    scale_dtype = "float16" if form == DQ else "float32"
    sch = QuantScheme(bits, 32 if not (form == DQ and bits == 8) else None, symmetric, form=form,
                      scale_dtype=scale_dtype)
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    arrays = quantize(w, sch)
    deq = dequantize(arrays, k, n, sch)
    x = rng.standard_normal((3, k)).astype(np.float16 if form == DQ else np.float32)
    sess = ort.InferenceSession(_one_node(sch, arrays, k, n).SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"x": x})
    got = outs[0].astype(np.float64)
    want = x.astype(np.float64) @ deq.astype(np.float64)
    # fp32 MatMulNBits: float rounding only; fp16 DQ + MatMul: fp16 weights and fp16 accumulation on the CPU
    assert np.abs(got - want).max() <= (1e-2 if form == DQ else 1e-4) * np.abs(want).max()
    if form == DQ:                                                      # the weight itself, to fp16 rounding
        assert np.abs(outs[1].astype(np.float32) - deq).max() <= 2 ** -10 * np.abs(deq).max()
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)                   # a real quantisation, not a copy
    assert (0.05 < rel < 0.2) if bits == 4 else (1e-3 < rel < 1e-2)


@pytest.fixture(scope="module")
def decoders(demo_sources, tmp_path_factory):
    from safeclip.export.decoder import export_decoder

    out = {}
    for tgt, w in (("cpu", "int8"), ("jetson", "int4")):
        d = tmp_path_factory.mktemp(f"{tgt}-{w}")
        out[tgt, w] = (d, export_decoder(demo_sources.llava, d, dtype=target(tgt).precision,
                                         quant=scheme_for(w, target(tgt))))
    return out


def _ops(path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return [n.op_type for n in m.graph.node], {o.domain: o.version for o in m.opset_import}


def test_int8_cpu_decoder_passes_parity_with_matmulnbits(decoders, demo_sources):
    d, frag = decoders["cpu", "int8"]
    ops, opsets = _ops(d / "decoder.onnx")
    layers = demo_sources.llava.config.text_config.num_hidden_layers
    # q/k/v and gate/up fused (one node each, then a Split), o and down alone: 4 nodes per layer, not 7; plus
    # lm_head, which int8 quantises by default (LM_HEAD_DEFAULT, issue 26)
    assert ops.count("MatMulNBits") == 4 * layers + 1 and opsets["com.microsoft"] == 1
    q = frag["graphs"]["decoder"]["quantization"]
    assert (q["bits"], q["block_size"], q["form"], q["accuracy_level"]) == (8, 32, "MatMulNBits", 4)
    assert q["lm_head"] is True and q["layers"][-1] == "lm_head"
    assert q["fused"] == [["gate_proj", "up_proj"], ["q_proj", "k_proj", "v_proj"]] and q["fused_nodes"] == 2 * layers
    names = [r.component for r in frag["parity"]]
    assert names == [f"decoder[float32, int8] {c}" for c in ("prefill", "decode", "decode, bucketed past",
                                                           "extend, bucketed past")]
    assert all(r.max_abs_err["logits"] <= r.atol["logits"] < 1e-2 for r in frag["parity"])   # the tight gate
    assert q["error"]["checked"] == "exact-compute graph"
    assert not list(d.glob(".*reference*"))                               # the exact-compute copy is gone
    err = q["error"]
    assert 1e-3 < err["weights"]["rel_frobenius_mean"] < 1e-2 and err["weights"]["layers"] == 7 * layers + 1
    assert all(v["top1_agree"] for v in err["vs_unquantised"].values())


def _fused_graph_facts(path):
    """(MatMulNBits count, {N of each MatMulNBits}, Splits fed by a MatMulNBits with their split sizes)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path), load_external_data=False).graph
    consts = {t.name: t for t in g.initializer}
    mm = {n.output[0]: n for n in g.node if n.op_type == "MatMulNBits"}
    splits = [tuple(int(v) for v in numpy_helper.to_array(consts[n.input[1]]))
              for n in g.node if n.op_type == "Split" and n.input[0] in mm]
    ns = sorted({next(a.i for a in n.attribute if a.name == "N") for n in mm.values()})
    return len(mm), ns, splits


def test_fused_int4_graph_has_fewer_nodes_and_computes_what_the_unfused_one_does(demo_sources, tmp_path):
    """q/k/v -> one MatMulNBits [K, Nq+Nk+Nv] + Split, gate/up the same; the per-layer nodes of the unfused
    export are the oracle (same packed blocks, so the same outputs to float rounding), and both pass parity."""
    from dataclasses import replace

    import onnxruntime as ort

    from safeclip.export.decoder import export_decoder

    cfg = demo_sources.llava.config.text_config
    layers, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    fused = scheme_for("int4", target("cpu"))
    assert fused.fuse_shared_input and not scheme_for("int4", target("jetson")).fuse_shared_input
    dirs = {}
    for name, sch in (("fused", fused), ("unfused", replace(fused, fuse_shared_input=False))):
        dirs[name] = tmp_path / name
        frag = export_decoder(demo_sources.llava, dirs[name], dtype="float32", quant=sch)
        assert all(r.max_abs_err["logits"] <= r.atol["logits"] for r in frag["parity"])      # vs PyTorch
    n_f, ns_f, splits_f = _fused_graph_facts(dirs["fused"] / "decoder.onnx")
    n_u, ns_u, splits_u = _fused_graph_facts(dirs["unfused"] / "decoder.onnx")
    assert (n_f, n_u) == (4 * layers + 1, 7 * layers + 1) and splits_u == []             # + the int8 lm_head
    assert sorted(splits_f) == sorted([(hidden, kv, kv)] * layers + [(inter, inter)] * layers)
    assert hidden + 2 * kv in ns_f and 2 * inter in ns_f
    data = {k: (d / "decoder.onnx.data").stat().st_size for k, d in dirs.items()}
    assert data["fused"] == data["unfused"]                                   # the same bytes, packed together
    from _lm_models import prefill_feeds

    sess = {k: ort.InferenceSession(str(d / "decoder.onnx"), providers=["CPUExecutionProvider"])
            for k, d in dirs.items()}
    feeds = prefill_feeds(cfg)
    outs = {k: s.run(None, feeds) for k, s in sess.items()}
    for a, b in zip(outs["fused"], outs["unfused"]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max()))


def test_tensorrt_int4_graph_passes_the_parser_check_and_old_versions_refuse(decoders):
    from safeclip.export.trt_check import check_onnx_for_tensorrt

    d, frag = decoders["jetson", "int4"]
    import onnx
    g = onnx.load(str(d / "decoder.onnx"), load_external_data=False).graph
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    feeds = {n.input[1] for n in g.node if n.op_type == "MatMul"}
    assert len(dq) == 7 * 2 and all(n.output[0] in feeds for n in dq)             # 7 linear layers x 2 layers
    ops, opsets = _ops(d / "decoder.onnx")
    assert opsets[""] == 21 and "MatMulNBits" not in ops
    for version in ("10.3", "11.4"):
        assert check_onnx_for_tensorrt(d / "decoder.onnx", version) == []
    old = check_onnx_for_tensorrt(d / "decoder.onnx", "9.3")
    assert old and all("INT4 weights need TensorRT 10.0" in i.problem for i in old)
    assert frag["graphs"]["decoder"]["quantization"]["form"] == "DequantizeLinear"


def _dq_model(qtype, wshape, sshape, axis, block=None, feed_b=True, weight_input=False):
    from onnx import TensorProto, helper, numpy_helper

    count = int(np.prod(wshape))
    nbytes = (count + 1) // 2 if qtype == TensorProto.INT4 else count
    inits = [numpy_helper.from_array(np.ones(sshape, np.float16), "S")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, wshape[0]])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("B", qtype, wshape))
    else:
        inits.append(helper.make_tensor("B", qtype, wshape, bytes(nbytes), raw=True))
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    mm = ["x", "w"] if feed_b else ["w", "x"]
    nodes = [helper.make_node("DequantizeLinear", ["B", "S"], ["w"], name="dq", **attrs),
             helper.make_node("MatMul", mm, ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_block_quantisation_rules():
    from onnx import TensorProto

    from safeclip.export.trt_check import check_onnx_for_tensorrt

    def problems(model):
        return " | ".join(i.problem for i in check_onnx_for_tensorrt(model, "10.3"))

    assert problems(_dq_model(TensorProto.INT4, [64, 8], [2, 8], 0, 32)) == ""
    assert "INT4 only" in problems(_dq_model(TensorProto.INT8, [64, 8], [2, 8], 0, 32))
    assert "along K (axis 0)" in problems(_dq_model(TensorProto.INT4, [64, 8], [64, 4], 1, 2))
    assert "must be block-quantised" in problems(_dq_model(TensorProto.INT4, [64, 8], [8], 1))
    assert "`block_size` 16 differs" in problems(_dq_model(TensorProto.INT4, [64, 8], [2, 8], 0, 16))
    assert "constant weight" in problems(_dq_model(TensorProto.INT4, [64, 8], [2, 8], 0, 32, weight_input=True))
    assert "odd last dimension" in problems(_dq_model(TensorProto.INT4, [64, 7], [2, 7], 0, 32))
    assert problems(_dq_model(TensorProto.INT8, [64, 8], [8], 1)) == ""          # int8 per channel


@pytest.fixture(scope="module")
def int4_bundle(demo_sources, tmp_path_factory):
    from safeclip.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("q") / "int4"
    export_bundle(ExportOptions(model="demo", out=out, weights="int4"))
    return out


def test_manifest_records_the_scheme_and_the_runtime_reads_it(int4_bundle, monkeypatch):
    from safeclip.runtime import manifest as manifest_mod
    from safeclip.runtime.manifest import BundleError, load_manifest

    m = json.loads((int4_bundle / "manifest.json").read_text())
    q = m["graphs"]["decoder"]["quantization"]
    assert {k: q[k] for k in ("bits", "block_size", "symmetric", "method", "form", "lm_head", "embeddings")} == \
        {"bits": 4, "block_size": 32, "symmetric": True, "method": "rtn", "form": "MatMulNBits", "lm_head": True,
         "embeddings": "float"}
    assert q["layers"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    assert m["graphs"]["vision_gate"]["precision"] == "float32"                  # the tower is not quantised
    scheme = load_manifest(int4_bundle).decoder_quantization
    assert (scheme.bits, scheme.block_size, scheme.form, scheme.lm_head) == (4, 32, "MatMulNBits", True)
    monkeypatch.setattr(manifest_mod, "matmulnbits_available", lambda: False)
    with pytest.raises(BundleError) as e:
        load_manifest(int4_bundle)
    assert "lacks" in str(e.value) and "MatMulNBits" in str(e.value) and "\n" not in str(e.value)


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*"))


@pytest.mark.parametrize("argv,message", [
    (["--weights", "int3"], "unsupported --weights 'int3'"),
    (["--weights", "fp8"], "Jetson Orin (sm_87) has no FP8"),
    (["--weights", "int4", "--block-size", "48"], "unsupported --block-size 48"),
    (["--weights", "int4", "--block-size", "64"], "has K=160 input features, not divisible by the block size 64"),
    (["--weights", "int4", "--quant-method", "awq"], "--quant-method awq is not available"),
    (["--weights", "int4", "--target", "jetson", "--zero-point"], "TensorRT's DequantizeLinear takes only zero"),
    (["--weights", "fp32", "--target", "jetson"], "does not match --target jetson"),
    (["--weights", "int8", "--target", "jetson"], "--weights int8 is not offered for --target jetson: TensorRT documents "
                                                  "weight-only quantization for INT4 only"),
    (["--weights", "int4", "--no-decoder"], "cannot go with --no-decoder"),
])
def test_bad_quantisation_requests_fail_in_one_line_and_write_nothing(argv, message, int4_bundle, tmp_path, capsys):
    import shutil

    from safeclip.export.cli import main

    out = tmp_path / "bundle"
    shutil.copytree(int4_bundle, out)                                     # an existing bundle must stay as it is
    before = _tree(tmp_path)
    assert main(["--out", str(out), *argv]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safeclip-export: error")]
    assert len(errors) == 1 and message in errors[0], errors
    assert _tree(tmp_path) == before                                      # no temporary folder left either


def test_eval_quant_perplexity_equals_transformers_and_reports_agreement(demo_bundle, int4_bundle, demo_sources,
                                                                         test_images, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import eval_quant
    from tokenizers import Tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "r.json"
    assert eval_quant.main(["--reference", str(demo_bundle), "--candidate", str(int4_bundle), "--text",
                            str(tmp_path / "t.txt"), "--images", str(test_images / "red.png"),
                            str(test_images / "blue.jpg"), "--max-new-tokens", "8", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    tok = Tokenizer.from_file(str(demo_bundle / "tokenizer.json"))
    bos = r["reference"]["model"]["bos_token_id"]
    ids = ([bos] if bos is not None else []) + tok.encode(text, add_special_tokens=False).ids
    with torch.no_grad():                                                # the oracle: transformers' own loss
        loss = demo_sources.llava(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert r["reference"]["perplexity"]["tokens_scored"] == len(ids) - 1
    assert abs(r["reference"]["perplexity"]["nll"] - loss) <= 1e-4 * max(1.0, loss)
    c = r["comparison"]
    assert c["images"] == 2 and c["verdict_agreement"] == 1.0 and 0.0 <= c["exact_agreement"] <= 1.0
    assert c["ppl_candidate"] > 0 and "perplexity" in capsys.readouterr().out


def test_lm_head_default_per_bit_width_and_the_flag_overrides_it():
    """Issue 26: int8 and int4 quantise lm_head to int8 by default on ONNX Runtime targets (BENCHMARKS.md "lm_head");
    --quantize-lm-head / --no-quantize-lm-head override it; a head tied to the embeddings stays float by default
    and is refused in one line when asked for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeclip.export.cli import build_parser
    from safeclip.export.quant import LM_HEAD_DEFAULT, linear_fqns, resolve_lm_head

    assert LM_HEAD_DEFAULT == {8: 8, 4: 8}
    cpu = target("cpu")
    assert scheme_for("int8", cpu).lm_head is None and scheme_for("int4", cpu).lm_head is None
    assert scheme_for("int4", cpu).lm_head_bits == 8 and scheme_for("int8", cpu).lm_head_bits is None
    assert scheme_for("int4", target("jetson")).lm_head is False
    assert scheme_for("int8", cpu, lm_head=False).lm_head is False and scheme_for("int4", cpu, lm_head=True).lm_head
    assert scheme_for("fp32", cpu, lm_head=False) is None
    with pytest.raises(QuantError, match="need --weights int8 or int4"):
        scheme_for("fp32", cpu, lm_head=True)
    p = build_parser()
    assert [p.parse_args(["--out", "x", *a]).quantize_lm_head for a in
            ([], ["--quantize-lm-head"], ["--no-quantize-lm-head"])] == [None, True, False]
    for tied in (False, True):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
        fqn_of = {id(v): k for k, v in model.named_parameters(remove_duplicate=False)}
        head = fqn_of[id(model.lm_head.weight)]
        for sch, quantised in ((scheme_for("int8", cpu), not tied), (scheme_for("int4", cpu), not tied),
                               (scheme_for("int8", cpu, lm_head=False), False)):
            fqns = linear_fqns(model.model, model.lm_head, fqn_of, sch)
            assert (head in fqns) is quantised and len(fqns) == 7 + quantised
            assert resolve_lm_head(sch, fqns, model.lm_head, fqn_of).lm_head is quantised
        if tied:
            with pytest.raises(QuantError, match="lm_head is tied to the token embeddings"):
                linear_fqns(model.model, model.lm_head, fqn_of, scheme_for("int8", cpu, lm_head=True))


def test_lm_head_bits_requests_and_refusals():
    """--lm-head-bits: the head's own bit width (MatMulNBits only), implying --quantize-lm-head; the body's own
    width is no separate width; TensorRT targets, float exports, an unquantised head and odd widths are refused."""
    from safeclip.export.cli import build_parser

    cpu = target("cpu")
    s = scheme_for("int4", cpu, lm_head_bits=8)
    assert (s.bits, s.lm_head, s.lm_head_bits) == (4, True, 8)
    assert scheme_for("int4", cpu, lm_head=True).lm_head_bits is None          # the flag alone: the body's width
    assert scheme_for("int4", cpu, lm_head=True, lm_head_bits=4).lm_head_bits is None
    assert scheme_for("int8", cpu).lm_head_bits is None                   # int8 head under int8: the same width
    for kw, msg in (({"weights": "int4", "target": target("jetson"), "lm_head_bits": 8}, "not offered for --target"),
                    ({"weights": "fp32", "target": cpu, "lm_head_bits": 8}, "need --weights int8 or int4"),
                    ({"weights": "int4", "target": cpu, "lm_head": False, "lm_head_bits": 8}, "--no-quantize-lm-head"),
                    ({"weights": "int4", "target": cpu, "lm_head_bits": 6}, "unsupported --lm-head-bits 6")):
        with pytest.raises(QuantError, match=msg):
            scheme_for(**kw)
    p = build_parser()
    assert p.parse_args(["--out", "x", "--lm-head-bits", "8"]).lm_head_bits == 8
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--lm-head-bits", "6"])


def test_int4_default_int8_head_and_greedy_tokens_equal_transformers(int4_bundle, demo_sources):
    """The default int4 bundle (LM_HEAD_DEFAULT: an int8 head, as --lm-head-bits 8 asks): the head's MatMulNBits
    is 8-bit, every other one 4-bit; the manifest says so and the contract reads it (a width on a float head is
    refused); the pipeline's greedy tokens equal transformers' with each weight
    dequantised at its own width, the decoder session on the exact-compute copy of the graph (the parity gate's:
    ``accuracy_level`` dropped). The served graph's int8 activation rounding (accuracy_level 4) is the kernel's and
    not gated (runtime/tolerances.py): on the demo's near-tied random logits it flips a token within 16 steps."""
    import dataclasses

    import onnx

    from safeclip.export.quant import DequantizedWeights, linear_fqns
    from safeclip.export.quant_parity import exact_compute_copy
    from safeclip.export.weights import ModuleWeights, fqn_of_params
    from safeclip.runtime.contract import ContractError, WeightQuantization
    from safeclip.runtime.manifest import load_manifest
    from safeclip.runtime.pipeline import Pipeline
    from test_pipeline import hf_generate

    m = json.loads((int4_bundle / "manifest.json").read_text())
    q = m["graphs"]["decoder"]["quantization"]
    assert (q["bits"], q["lm_head"], q["lm_head_bits"], q["layers"][-1]) == (4, True, 8, "lm_head")
    g = onnx.load(str(int4_bundle / m["graphs"]["decoder"]["file"]), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in g.node if n.op_type == "MatMulNBits"}
    vocab = demo_sources.llava.config.text_config.vocab_size
    n_of = {n.name: next(a.i for a in n.attribute if a.name == "N") for n in g.node if n.op_type == "MatMulNBits"}
    assert sorted(b for k, b in bits.items() if n_of[k] == vocab) == [8]
    assert set(b for k, b in bits.items() if n_of[k] != vocab) == {4} and len(bits) > 1
    wq = load_manifest(int4_bundle).decoder_quantization
    assert (wq.bits, wq.lm_head, wq.lm_head_bits) == (4, True, 8)
    with pytest.raises(ContractError, match="lm_head_bits"):
        WeightQuantization.from_json({**q, "lm_head": False})

    model = copy.deepcopy(demo_sources.llava)
    fqn_of = fqn_of_params(model)
    lm = model.model.language_model
    scheme = QuantScheme(4, q["block_size"], True, form=MATMULNBITS, accuracy_level=4, lm_head=True, lm_head_bits=8)
    fqns = linear_fqns(lm, model.lm_head, fqn_of, scheme)
    scheme = dataclasses.replace(scheme, head=fqn_of[id(model.lm_head.weight)])
    assert scheme.of(scheme.head).bits == 8 and scheme.of(next(f for f in fqns if f != scheme.head)).bits == 4
    deq = DequantizedWeights(ModuleWeights(demo_sources.llava), scheme, fqns)
    with torch.no_grad():
        for fqn in deq.fqns:
            model.get_parameter(fqn).copy_(deq.read(fqn))
    oracle = types.SimpleNamespace(llava=model, llava_path=demo_sources.llava_path)
    pipe = Pipeline.load(int4_bundle)
    served = pipe.language_model.decoder
    exact = exact_compute_copy(int4_bundle / m["graphs"]["decoder"]["file"])
    try:
        pipe.language_model.decoder = type(served)(exact, served.kv, capacity=served.capacity, names=served.names)
        for prompt in ("Tell me a story.", "Name three colours."):
            got = pipe.generate(None, prompt, max_new_tokens=N).token_ids
            want, _ = hf_generate(oracle, pipe, None, prompt, max_new_tokens=N)
            assert list(got) == want
    finally:
        exact.unlink()


def test_int8_is_refused_for_tensorrt_targets_only():
    """Issue 22, 1.6: TensorRT documents weight-only quantization for INT4 only; int8 stays on ONNX Runtime."""
    for name in ("jetson", "datacenter"):
        with pytest.raises(QuantError, match=f"--weights int8 is not offered for --target {name}: .*--weights int4"):
            scheme_for("int8", target(name))
        assert scheme_for("int4", target(name)).bits == 4
    assert scheme_for("int8", target("cpu")).bits == 8
