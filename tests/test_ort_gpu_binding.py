"""ONNX Runtime decoders under a GPU provider's binding semantics (``_ort_binding.copy_at_bind``): host inputs
are copied when bound, as the CUDA provider does, so an input bound once and edited in place later is stale.

Oracle: the same decoder on the CPU's aliasing semantics, step for step (itself token-exact against
transformers in test_generate.py), over enough steps to stay inside one bucket and to cross bucket growth."""
from __future__ import annotations

import numpy as np
import pytest

from _ort_binding import copy_at_bind

from safeclip.runtime.graph_spec import DecoderNames
from safeclip.runtime.backends.ort import OrtDecoder
from safeclip.runtime.backends.slots import SlotDecoder

HOST_INPUTS = DecoderNames().inputs                      # embeddings, mask, positions: host memory on a GPU


@pytest.fixture(scope="module")
def demo(demo_decoder_parts):
    return demo_decoder_parts


def _greedy_logits(dec, table, ids, steps):
    logits, out = dec.prefill(table[ids]).copy(), []
    for _ in range(steps):
        out.append(logits)
        logits = dec.decode_one_token(table[int(np.argmax(logits))]).copy()
    return np.stack(out)


def test_copy_at_bind_models_a_gpu_provider(demo, monkeypatch):
    """The harness itself: an in-place edit after binding is seen on the CPU and not under copy-at-bind."""
    import onnxruntime as ort

    m, kv, table = demo
    x = np.ones((1, 3), np.float32)
    for gpu_like in (False, True):
        if gpu_like:
            copy_at_bind(monkeypatch, ["x"])
        from onnx import TensorProto, helper
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
        sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        io = sess.io_binding()
        x[:] = 1
        io.bind_input("x", "cpu", 0, np.float32, [1, 3], x.ctypes.data)
        io.bind_output("y", "cpu")
        x[:] = 2                                            # edited after binding
        sess.run_with_iobinding(io)
        assert io.copy_outputs_to_cpu()[0].tolist() == [[1.0] * 3 if gpu_like else [2.0] * 3]


def test_one_sequence_decoder_is_right_when_host_inputs_are_copied_at_bind(demo, monkeypatch):
    m, kv, table = demo
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    ref = _greedy_logits(OrtDecoder(m.path("decoder.onnx"), kv, capacity=64), table, ids, 30)
    stats = copy_at_bind(monkeypatch, HOST_INPUTS)
    got = _greedy_logits(OrtDecoder(m.path("decoder.onnx"), kv, capacity=64), table, ids, 30)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert [int(np.argmax(r)) for r in got] == [int(np.argmax(r)) for r in ref]
    assert stats["snapshots"] >= 3 * 30                   # every step bound its host inputs


def test_truncate_and_extend_are_right_when_host_inputs_are_copied_at_bind(demo, monkeypatch):
    m, kv, table = demo
    ids = list(range(10, 30))

    def run():
        d = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64, extend_max=3)
        d.prefill(table[ids[:6]])
        for t in ids[6:12]:
            d.decode_one_token(table[t])
        d.truncate(4)
        return d.extend(table[ids[4:]]).copy()

    ref = run()
    copy_at_bind(monkeypatch, HOST_INPUTS)
    np.testing.assert_allclose(run(), ref, atol=1e-5, rtol=0)


def test_slot_decoder_is_right_when_host_inputs_are_copied_at_bind(demo, monkeypatch):
    m, kv, table = demo
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]

    def run():
        base = OrtDecoder(m.path("decoder.onnx"), kv, capacity=48)
        dec = SlotDecoder.sharing(base, 2, capacity=48)
        toks = [int(np.argmax(dec.prefill(i, table[p]))) for i, p in enumerate(prompts)]
        out = []
        for _ in range(20):
            logits = dec.decode(table[toks]).copy()
            out.append(logits)
            toks = [int(np.argmax(r)) for r in logits]
        return np.stack(out)

    ref = run()
    copy_at_bind(monkeypatch, HOST_INPUTS)
    np.testing.assert_allclose(run(), ref, atol=1e-5, rtol=0)
