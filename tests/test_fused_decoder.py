"""The cpu target's fused decoder (export/fused_decoder.py) and its KV form "shared" (runtime/backends/ort_shared.py).

Oracles: the export's parity gate against transformers (it raises on a mismatch, so an export that returns passed
it); greedy tokens against transformers' ``generate`` run in test_generate.py (``*-fused``) and batched ==
alone in test_scheduler.py (``fused``). Here: what the graph contains, the int4 graph (fused q/k/v packed into
GroupQueryAttention), the one-sequence decoder's cache operations against a fresh prefill, and the contract.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from _lm_models import demo_model, exported  # noqa: E402

from safeclip.runtime.backends.base import ContextError  # noqa: E402
from safeclip.runtime.backends.ort_shared import SharedKVDecoder  # noqa: E402

FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention", "MatMul",
             "Sigmoid", "Mul", "Slice"}


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.fixture(scope="module")
def lm():
    return exported(2, "float32", fused=True)


def _decoder(lm, capacity=48):
    return SharedKVDecoder.from_manifest(lm.bundle, lm.frag["graphs"]["decoder"], capacity=capacity)


def test_cpu_bundle_decoder_is_the_fused_graph(demo_bundle):
    """The cpu target's bundle: per layer one GroupQueryAttention taking q/k/v packed from one MatMul and two
    skip-norms (the first layer's input norm plain), SiLU as Sigmoid*Mul, the last position sliced; none of the
    traced graph's Reshape/Transpose/Concat/Neg/Softmax; the manifest declares KV form "shared" and its names."""
    dec = json.loads((demo_bundle / "manifest.json").read_text())["graphs"]["decoder"]
    L = dec["kv"]["num_layers"]
    ops = _ops(demo_bundle / dec["file"])
    assert set(ops) <= FUSED_OPS, set(ops) - FUSED_OPS
    assert ops.count("GroupQueryAttention") == L == dec["fusions"]["GroupQueryAttention"]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * L and ops.count("SimplifiedLayerNormalization") == 1
    # fp32 q/k/v: one MatMul of the three weights side by side, taken by GroupQueryAttention as packed QKV
    assert ops.count("MatMul") == 5 * L + 1 and len(ops) == 11 * L + 3 and dec["fusions"]["packed_qkv"] == L
    gqa = [n for n in onnx.load(str(demo_bundle / dec["file"]), load_external_data=False).graph.node
           if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == "" and n.input[2] == "" for n in gqa)
    assert dec["kv"]["form"] == "shared"
    assert dec["names"] == {"inputs_embeds": "inputs_embeds", "seqlens_k": "seqlens_k",
                            "total_sequence_length": "total_sequence_length", "logits": "logits"}
    assert dec["inputs"]["seqlens_k"] == {"shape": ["batch"], "dtype": "int32"}
    assert dec["outputs"]["present.0.key"]["shape"] == dec["inputs"]["past_key_values.0.key"]["shape"]
    import onnxruntime as ort

    from safeclip.runtime.graph_spec import shared_decoder_spec
    from safeclip.runtime.manifest import load_manifest

    g = load_manifest(demo_bundle).decoder
    spec = shared_decoder_spec(dec["inputs"]["inputs_embeds"]["shape"][-1], dec["outputs"]["logits"]["shape"][-1],
                               g.kv, g.names)
    assert (g.inputs, g.outputs) == (spec.inputs_by_name, spec.outputs_by_name)
    s = ort.InferenceSession(str(demo_bundle / dec["file"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == spec.input_names
    assert [o.name for o in s.get_outputs()] == spec.output_names


def test_int4_fused_graph_packs_qkv_into_attention(tmp_path):
    """int4 (block 32 fits the demo): q/k/v become one MatMulNBits whose output GroupQueryAttention takes as
    packed QKV (no Split), gate/up one MatMulNBits + Split: 4 weight nodes a layer. The parity gate ran on it."""
    from safeclip.export.decoder import export_decoder
    from safeclip.export.quant import scheme_for
    from safeclip.export.targets import target

    _, model, tok = demo_model(2)
    sch = scheme_for("int4", target("cpu"), 32)
    frag = export_decoder(model, tmp_path, tokenizer=tok, quant=sch, ort_fusions=True, fused=True)
    dec = frag["graphs"]["decoder"]
    L = dec["kv"]["num_layers"]
    g = onnx.load(str(tmp_path / dec["file"]), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    # + lm_head, an int8 MatMulNBits under the int4 body (LM_HEAD_DEFAULT)
    assert ops.count("MatMulNBits") == 4 * L + 1 and ops.count("Split") == L and ops.count("MatMul") == 0
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == L and all(n.input[1] == "" and n.input[2] == "" for n in gqa)
    used = {i for n in g.node for i in n.input}
    assert not [t.name for t in g.initializer if t.name not in used]          # the dropped Splits left nothing
    assert dec["fusions"]["packed_qkv"] == L
    assert dec["quantization"]["error"]["vs_unquantised"]["prefill"]["top1_agree"] in (True, False)


def test_cache_operations_equal_a_fresh_prefill(lm):
    """extend, truncate, kv_read/kv_write on the in-place buffer give the logits of prefilling the same tokens."""
    table = np.load(lm.bundle / "embed_tokens.npy")
    ids = np.random.default_rng(0).integers(5, table.shape[0], 20)
    fresh = _decoder(lm)
    full = fresh.prefill(table[ids]).copy()
    dec = _decoder(lm)
    dec.prefill(table[ids[:7]])
    dec.extend(table[ids[7:12]])
    for t in ids[12:19]:
        dec.decode_one_token(table[t])
    np.testing.assert_allclose(dec.decode_one_token(table[ids[19]]), full, atol=1e-5, rtol=0)
    assert dec.length == 20
    dec.truncate(9)                                           # rows 9.. stay in the buffer, never read again
    np.testing.assert_allclose(dec.extend(table[ids[9:]]), full, atol=1e-5, rtol=0)
    saved = dec.kv_read(15)
    other = _decoder(lm)
    other.kv_write(saved)
    assert other.length == 15
    np.testing.assert_allclose(other.extend(table[ids[15:]]), full, atol=1e-5, rtol=0)
    for a, b in zip(saved, fresh.kv_read(15)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ContextError, match="exceed the cache capacity 48"):
        other.extend(table[np.arange(29)])


def test_batched_decode_gives_each_sequence_its_own_length(lm):
    """One call of B = 3 sequences of lengths 3, 11, 6 (seqlens_k per row) equals each sequence's own step."""
    from safeclip.runtime.backends.ort_shared import SharedSlotDecoder

    table = np.load(lm.bundle / "embed_tokens.npy")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, table.shape[0], n) for n in (3, 11, 6)]
    nxt = rng.integers(5, table.shape[0], 3)
    one = _decoder(lm)
    slots = SharedSlotDecoder.sharing(one, 3)
    for s, p in enumerate(prompts):
        slots.prefill(s, table[p])
    got = slots.decode(table[nxt]).copy()
    for s, p in enumerate(prompts):
        ref = _decoder(lm)
        ref.prefill(table[p])
        np.testing.assert_allclose(got[s], ref.decode_one_token(table[nxt[s]]), atol=1e-5, rtol=0)
    assert list(slots.lengths) == [4, 12, 7]


def test_contract_reads_the_shared_form_and_refuses_unknown_ones(lm):
    from safeclip.runtime.contract import ContractError, DecoderGraph
    from safeclip.runtime.graph_spec import SharedDecoderNames

    graph = lm.frag["graphs"]["decoder"]
    g = DecoderGraph.from_json(graph)
    assert g.kv_form == "shared" and isinstance(g.names, SharedDecoderNames)
    bad = json.loads(json.dumps(graph))
    bad["kv"]["form"] = "paged"
    with pytest.raises(ContractError, match="kv.form 'paged' is not one this runtime reads"):
        DecoderGraph.from_json(bad)
    del bad["names"]["seqlens_k"], bad["inputs"]["seqlens_k"]
    bad["kv"]["form"] = "shared"
    with pytest.raises(ContractError, match="input 'seqlens_k' named in the manifest is not among"):
        DecoderGraph.from_json(bad)


def test_auto_backend_keeps_the_fused_graph_on_the_cpu(demo_bundle):
    """A GPU machine's onnxruntime-cuda is passed over for the fused graph (untested there) and refused when
    asked for by name."""
    from safeclip.runtime.backends.base import BackendError
    from safeclip.runtime.backends.pick import Probe, choose_backend
    from safeclip.runtime.manifest import load_manifest

    class Gpu(Probe):
        def tensorrt_device(self):
            raise BackendError("no TensorRT here")

        def ort_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    m = load_manifest(demo_bundle)
    choice = choose_backend(m, "auto", Gpu())
    assert choice.name == "onnxruntime-cpu" and any("fused graph" in n for n in choice.notes)
    with pytest.raises(BackendError, match="fused graph"):
        choose_backend(m, "onnxruntime-cuda", Gpu())


def test_a_quantised_fused_graph_is_declared_shared_whatever_the_quantiser_fused(tmp_path):
    """The manifest's KV form follows the graph written, not the quantiser's list of shared-input groups: with
    none fused (``fuse_shared_input=False``) the fused graph was declared form "new" with the shared graph's
    names, a section the contract refuses (found by scripts/bench_fused.py)."""
    from dataclasses import replace

    from safeclip.export.decoder import export_decoder
    from safeclip.export.quant import scheme_for
    from safeclip.export.targets import target
    from safeclip.runtime.contract import DecoderGraph

    _, model, tok = demo_model(2)
    sch = replace(scheme_for("int8", target("cpu"), 32), fuse_shared_input=False)
    dec = export_decoder(model, tmp_path, tokenizer=tok, quant=sch, ort_fusions=True, fused=True)["graphs"]["decoder"]
    assert dec["kv"]["form"] == "shared"
    assert DecoderGraph.from_json(dec).kv_form == "shared"
