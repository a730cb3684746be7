"""Decoder export: ONNX Runtime vs PyTorch on prefill (P = 0) and decode, batch, padding, GQA and MHA, fp16; the
graph returns only the call's new keys and values, and no node writes a tensor of the cache's size."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from _lm_models import exported  # noqa: E402

from safeclip.export import decoder as dec  # noqa: E402
from safeclip.export.parity import ParityError  # noqa: E402


@pytest.fixture(scope="module")
def gqa():
    return exported(2, "float32")


def _ort_session(lm):
    return ort.InferenceSession(str(lm.bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])


def _reference(lm, args):
    wrapper = dec.decoder_for_export(lm.model.model.language_model, lm.model.lm_head).eval()
    with torch.no_grad():
        return [t.numpy() for t in wrapper(*args)]


def _case(lm, b, p, s, pad=0, seed=0):
    cfg = lm.model.config.text_config
    g = torch.Generator().manual_seed(seed)
    table = lm.model.model.language_model.embed_tokens.weight.detach()
    x = table[torch.randint(0, cfg.vocab_size, (b, s), generator=g)]
    mask = torch.ones(b, p + s, dtype=torch.int64)
    mask[0, :pad] = 0                                                  # left padding on the first row
    pos = (torch.arange(p, p + s)[None].repeat(b, 1) - torch.tensor([[pad]] + [[0]] * (b - 1))).clamp(min=0)
    kvh, hd = cfg.num_key_value_heads, cfg.head_dim
    past = [torch.randn(b, kvh, p, hd, generator=g) * 0.5 for _ in range(2 * cfg.num_hidden_layers)]
    return (x, mask, pos, *past)


def test_fragment_matches_graph_and_model(gqa):
    frag, cfg = gqa.frag, gqa.model.config
    g = frag["graphs"]["decoder"]
    sess = _ort_session(gqa)
    assert [i.name for i in sess.get_inputs()] == list(g["inputs"])
    assert [o.name for o in sess.get_outputs()] == list(g["outputs"])
    kv = g["kv"]
    assert (kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]) == (
        cfg.text_config.num_hidden_layers, cfg.text_config.num_key_value_heads, cfg.text_config.head_dim)
    assert kv["num_kv_heads"] < cfg.text_config.num_attention_heads          # the demo is GQA
    assert kv["past_key"].format(i=1) in g["inputs"] and kv["present_value"].format(i=1) in g["outputs"]
    assert all((gqa.bundle / f).is_file() for f in (g["file"], g["data"], frag["embeddings"]["file"]))
    assert {p.name for p in frag["files"]} == {g["file"], g["data"], frag["embeddings"]["file"]}
    table = np.load(gqa.bundle / frag["embeddings"]["file"])
    assert list(table.shape) == frag["embeddings"]["shape"]
    np.testing.assert_array_equal(table, gqa.model.model.language_model.embed_tokens.weight.detach().numpy())
    m = frag["model"]
    tok = gqa.hf_tokenizer
    assert m["image_token"] == tok.image_token and m["image_token_id"] == tok.convert_tokens_to_ids(tok.image_token)
    assert m["eos_token_ids"] == [tok.eos_token_id] and m["bos_token_id"] == tok.bos_token_id
    assert m["pad_token_id"] == tok.pad_token_id and m["vocab_size"] == len(tok)
    assert m["context_length"] == cfg.text_config.max_position_embeddings
    assert m["image_seq_length"] == cfg.image_seq_length
    names = [r.component for r in frag["parity"]]
    assert names == ["decoder[float32] prefill", "decoder[float32] decode", "decoder[float32] decode, bucketed past",
                     "decoder[float32] extend, bucketed past"]
    assert g["kv"]["form"] == "new" and g["outputs"]["present.0.key"]["shape"] == ["batch", 2, "seq", 16]
    for r in frag["parity"]:
        assert max(r.max_abs_err.values()) < 1e-5, str(r)


@pytest.mark.parametrize("b,p,s,pad", [(1, 0, 1, 0), (1, 0, 9, 0), (1, 6, 1, 0), (2, 4, 3, 2), (3, 0, 5, 1)])
def test_ort_matches_torch(gqa, b, p, s, pad):
    """Prefill with an empty past (P = 0) and batch sizes other than the export sample's."""
    args = _case(gqa, b, p, s, pad)
    ref = _reference(gqa, args)
    got = _ort_session(gqa).run(None, {n: a.numpy() for n, a in zip(dec.decoder_names(2)[0], args)})
    assert got[0].shape == (b, 1, gqa.model.config.text_config.vocab_size)
    assert got[1].shape == (b, 2, s, 16)                               # the call's new rows only
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=0)
    # A padded query sees no key at all: its hidden state (hence later layers' keys there) is arbitrary and
    # differs between attention implementations; it is masked out for every real token.
    keep = args[1].numpy().astype(bool)[:, p:]                         # [B, S]
    for r, o in zip(ref[1:], got[1:]):
        np.testing.assert_allclose(o.transpose(0, 2, 1, 3)[keep], r.transpose(0, 2, 1, 3)[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_no_node_writes_a_cache_sized_tensor(tmp_path, dtype):
    """The past keys and values feed only matrix products and shape reads: no Concat, Expand (GQA's
    repeat_kv) or Cast copies the cache per step. The exported graph's one Transpose of each past key feeds
    only its MatMul, and ONNX Runtime folds it into FusedMatMul (checked on the fp32 graph: for an fp16
    graph the CPU provider, which lacks fp16 MatMul, inserts casts of its own; GPU providers do not)."""
    import onnx

    lm = exported(2, dtype)
    graph = onnx.load(str(lm.bundle / "decoder.onnx"), load_external_data=False).graph
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    readers = [n for n in graph.node if past & set(n.input)]
    assert len(past) == 4 and {n.op_type for n in readers} == {"MatMul", "Shape", "Transpose"}
    for t in (n for n in readers if n.op_type == "Transpose"):
        assert {n.op_type for n in graph.node if t.output[0] in n.input} == {"MatMul"}
    if dtype == "float32":
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(lm.bundle / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph
        assert {n.op_type for n in opt.node if past & set(n.input)} == {"MatMul", "FusedMatMul", "Shape"}


def test_callers_model_is_unchanged(gqa):
    lm = gqa.model.model.language_model
    assert lm.config._attn_implementation != dec.ATTENTION
    assert next(lm.parameters()).dtype == torch.float32
    exported(2, "float16")                      # converts a copy, never the model itself
    assert next(lm.parameters()).dtype == torch.float32
    assert lm.rotary_emb.inv_freq.dtype == torch.float32


def test_mha_export():
    mha = exported(4, "float32")
    kv = mha.frag["graphs"]["decoder"]["kv"]
    assert kv["num_kv_heads"] == mha.model.config.text_config.num_attention_heads == 4
    args = _case(mha, 1, 5, 2)
    ref = _reference(mha, args)
    got = _ort_session(mha).run(None, {n: a.numpy() for n, a in zip(dec.decoder_names(2)[0], args)})
    for r, o in zip(ref, got):
        np.testing.assert_allclose(o, r, atol=1e-5, rtol=0)


def test_fp16_keeps_fp32_islands_and_parity():
    import onnx

    lm16 = exported(2, "float16")
    g = lm16.frag["graphs"]["decoder"]
    assert g["kv"]["dtype"] == "float16" and g["inputs"]["inputs_embeds"]["dtype"] == "float16"
    assert np.load(lm16.bundle / "embed_tokens.npy").dtype == np.float16
    model = onnx.shape_inference.infer_shapes(onnx.load(str(lm16.bundle / "decoder.onnx"), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    ops = [n for n in model.graph.node if n.op_type in ("Softmax", "ReduceMean")]
    assert len(ops) == 2 + (2 * 2 + 1)          # a softmax per layer; RMSNorm twice per layer + final norm
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in ops)
    for r in lm16.frag["parity"]:               # fp16 graph vs fp32 PyTorch
        assert all(v <= r.atol[k] for k, v in r.max_abs_err.items())
        assert max(r.max_abs_err.values()) > 0   # really computed in half precision
    # a long prefill (image-sized) stays close to fp32 as well
    args = _case(lm16, 1, 0, 600, seed=3)
    ref = _reference(lm16, args)[0]
    sess = ort.InferenceSession(str(lm16.bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {n: (a.half() if a.is_floating_point() else a).numpy()
                                for n, a in zip(dec.decoder_names(2)[0], args)})[0]
    assert np.abs(got.astype(np.float32) - ref).max() < dec.ATOL["float16"] * max(1.0, np.abs(ref).max())


def test_parity_gate_raises(gqa):
    lm = gqa.model.model.language_model
    wrapper = dec.decoder_for_export(lm, gqa.model.lm_head).eval()
    cases = dec._parity_cases(wrapper, lm.embed_tokens.weight.detach(), (2, 2, 16))
    assert len(dec._parity(gqa.bundle / "decoder.onnx", cases, 2, "float32")) == 4
    name, args, ref = cases[1]
    bad = [(name, args, (ref[0] + 1e-2, *ref[1:]))]
    with pytest.raises(ParityError, match="logits"):
        dec._parity(gqa.bundle / "decoder.onnx", bad, 2, "float32")


def test_unknown_dtype(gqa, tmp_path):
    with pytest.raises(ValueError, match="float32, float16"):
        dec.export_decoder(gqa.model, tmp_path, dtype="bfloat16")
