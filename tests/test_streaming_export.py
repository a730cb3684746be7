"""The streaming exporter: no model is ever loaded whole, weights are read tensor by tensor, the parity
reference holds one block at a time, and the written graphs are what ONNX Runtime can memory-map."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    from safeclip.export.demo import build_demo
    return build_demo(tmp_path_factory.mktemp("stream") / "demo")


def test_export_never_loads_the_model_and_reads_each_tensor_a_bounded_number_of_times(demo_dirs, tmp_path, monkeypatch):
    import transformers

    from safeclip.export import weights as W
    from safeclip.export.bundle import ExportOptions, export_bundle

    def refuse(*a, **k):
        raise AssertionError("from_pretrained must not be called by the streaming exporter")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", refuse)
    reads: dict[str, int] = {}
    real_read = W.SafetensorsCheckpoint.read

    def counting(self, key, dtype=None):
        if self.folder == demo_dirs[0]:
            reads[key] = reads.get(key, 0) + 1
        return real_read(self, key, dtype)

    monkeypatch.setattr(W.SafetensorsCheckpoint, "read", counting)
    llava, clip = demo_dirs
    rep = export_bundle(ExportOptions(model=str(llava), clip=str(clip), out=tmp_path / "b"))
    ckpt = W.SafetensorsCheckpoint(llava)
    # every LLaVA tensor the bundle needs was read; none more than 3 times (reference, graph, embedding table).
    # Unread: the tower's last layer and post-LayerNorm, which the reference gate never computes.
    last = json.loads((llava / "config.json").read_text())["vision_config"]["num_hidden_layers"] - 1
    unread = set(ckpt.keys()) - set(reads)
    assert unread and all(f"encoder.layers.{last}." in k or "post_layernorm" in k for k in unread), sorted(unread)
    assert max(reads.values()) <= 3
    assert (rep.bundle / "decoder.onnx").is_file()


def test_reference_holds_one_decoder_layer_at_a_time(demo_dirs):
    from safeclip.export.checkpoint import open_sources
    from safeclip.export.weights import Materialized, fqn_of_params

    src = open_sources(str(demo_dirs[0]), str(demo_dirs[1]), demo_dirs[0].parent)
    lm = src.llava.model.language_model
    assert all(p.device.type == "meta" for p in src.llava.parameters())
    seen = []

    def probe(module, args):
        seen.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in lm.layers))

    x = torch.randn(1, 4, lm.config.hidden_size)
    with Materialized([*lm.layers, lm.norm], fqn_of_params(src.llava), src.weights), torch.no_grad():
        handles = [layer.register_forward_pre_hook(probe) for layer in lm.layers]     # after Materialized's
        lm(inputs_embeds=x)
    for h in handles:
        h.remove()
    assert seen == [1] * len(lm.layers)              # the layer about to run, and no other
    assert all(p.device.type == "meta" for p in src.llava.parameters())   # released afterwards


def test_streamed_graph_folds_weight_transposes_and_aligns_large_tensors(demo_bundle):
    import onnx

    from safeclip.export.onnx import ALIGN, ALIGN_MIN

    for name in ("decoder.onnx", "vision_gate.onnx"):
        model = onnx.load(str(demo_bundle / name), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        transposed = [n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
        assert transposed == [], f"{name}: Transpose left on weights {transposed[:3]}"
        external = [i for i in inits.values() if i.data_location == onnx.TensorProto.EXTERNAL]
        assert external, name
        for init in external:
            info = {e.key: e.value for e in init.external_data}
            if int(info["length"]) >= ALIGN_MIN:
                assert int(info["offset"]) % ALIGN == 0, init.name


def test_streamed_fp32_graph_equals_the_module_in_memory(demo_sources, tmp_path):
    """The same decoder exported from a model in memory and streamed from its checkpoint: identical weights."""
    import onnx
    from onnx import numpy_helper

    from safeclip.export.checkpoint import open_sources
    from safeclip.export.decoder import export_decoder

    export_decoder(demo_sources.llava, tmp_path / "mem", dtype="float32")
    src = open_sources(str(demo_sources.llava_path), str(demo_sources.clip_path), tmp_path)
    export_decoder(src.llava, tmp_path / "stream", dtype="float32", weights=src.weights)

    def weights(d):
        m = onnx.load(str(d / "decoder.onnx"))
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}

    a, b = weights(tmp_path / "mem"), weights(tmp_path / "stream")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(np.load(tmp_path / "mem" / "embed_tokens.npy"),
                                  np.load(tmp_path / "stream" / "embed_tokens.npy"))
    w = demo_sources.llava.lm_head.weight.detach().numpy()
    assert any(np.array_equal(v, w.T) for v in b.values())      # the LM head, stored transposed for MatMul


def test_bf16_checkpoint_streams_to_fp16_and_fp32(tmp_path):
    """bf16 tensors are converted on the way (numpy has no bfloat16: read through torch)."""
    from safetensors.torch import save_file

    from safeclip.export.weights import SafetensorsCheckpoint

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t, "e": torch.zeros(0, 4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    ck = SafetensorsCheckpoint(tmp_path)
    assert torch.equal(ck.read("w"), t)
    assert torch.equal(ck.read("w", torch.float32), t.float())
    assert torch.equal(ck.read("w", torch.float16), t.to(torch.float16))
    assert ck.read("e").shape == (0, 4)
    assert json.loads(json.dumps(sorted(ck.keys()))) == ["e", "w"]


def test_tied_lm_head_streams_from_the_embedding_tensor(tmp_path):
    """A checkpoint saved with tied embeddings has no lm_head tensor: the head comes from the embedding's."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from safeclip.export.weights import SafetensorsCheckpoint, checkpoint_key_map, meta_model

    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=28, patch_size=14, projection_dim=16)
    t = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=99, tie_word_embeddings=True)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert not [k for k in ckpt.keys() if "lm_head" in k]
    keys = checkpoint_key_map(meta_model(LlavaForConditionalGeneration, cfg), ckpt)
    assert keys["lm_head.weight"] == keys["model.language_model.embed_tokens.weight"] == \
        "language_model.model.embed_tokens.weight"
