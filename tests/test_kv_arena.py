"""The one KV arena (runtime/backends/arena.py) behind OrtDecoder and TrtDecoder: in-place writes, repacks,
truncate/extend, kv_read/kv_write, and what a step copies.

Oracles: the arena's content against numpy bookkeeping of the same rows; the decoders against themselves run
another way (a fresh prefill of the whole sequence, OrtDecoder for TrtDecoder on the strict stand-in), and
the cache against transformers' own (test_generate.py checks generation against generate()).
"""
from __future__ import annotations

import numpy as np
import pytest

from _fake_trt import install_fakes, write_plan

from safeclip.runtime.backends.arena import MIN_BUCKET, HostArena, grow
from safeclip.runtime.backends.base import ContextError
from safeclip.runtime.backends.ort import OrtDecoder


def test_grow_at_least_doubles_and_caps_at_the_capacity():
    assert grow(0, 5, 100) == MIN_BUCKET and grow(16, 16, 100) == 16 and grow(16, 17, 100) == 32
    assert grow(60, 61, 100) == 100 and grow(40, 90, 100) == 90
    with pytest.raises(ContextError, match="101 positions exceed the cache capacity 100"):
        grow(100, 101, 100)


def test_repack_keeps_every_head_and_costs_amortised_o1_per_token():
    H, D, C = 3, 4, 300
    a = HostArena(2, H, D, C, np.float32)
    ref = np.zeros((2, H, 0, D), np.float32)
    rng = np.random.default_rng(0)
    a.bucket = 7                                                     # as after a 7-token prefill
    first = rng.standard_normal((2, H, 7, D)).astype(np.float32)
    a.view()[:] = first
    ref, n = first, 7
    for _ in range(C - 7):                                           # decode to the capacity, one row at a time
        a.ensure(n, n + 1)
        row = rng.standard_normal((2, H, 1, D)).astype(np.float32)
        a.write(n, row)
        ref, n = np.concatenate([ref, row], axis=2), n + 1
        np.testing.assert_array_equal(a.view()[:, :, :n], ref)
    assert a.bucket == C
    repacked = a.copied - 2 * H * (C - 7) * D * 4                   # bytes moved by repacks, writes taken out
    assert 0 < repacked < 2 * 2 * (H - 1) * C * D * 4               # fewer than two moves per row


@pytest.fixture(scope="module")
def demo(demo_decoder_parts):
    return demo_decoder_parts


def _greedy(dec, table, logits, n):
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = dec.decode_one_token(table[out[-1]])
    return out, logits


def test_a_step_copies_only_its_new_rows_and_the_cache_is_read_back(demo):
    m, kv, table = demo
    dec = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    dec.prefill(table[[5, 7, 9, 11]])
    assert dec.arena.bucket == 4                                     # the prefill wrote the arena, packed for 4
    dec.decode_one_token(table[1])                                   # 4 -> 16 rows: one repack
    before = dec.arena.copied
    dec.decode_one_token(table[2])
    row = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * 4     # one position of every layer's k and v
    assert dec.arena.copied - before == row and dec.length == 6
    got = dec.kv_read(6)
    assert len(got) == 2 * kv.num_layers and all(g.shape == (1, kv.num_kv_heads, 6, kv.head_dim) for g in got)
    for i in range(kv.num_layers):
        k, v = dec.cache(i)
        np.testing.assert_array_equal(got[2 * i], k)                  # the graph's order: layer i key, value
        np.testing.assert_array_equal(got[2 * i + 1], v)
    assert all(g.flags.owndata or g.base is not None for g in got)    # copies, not views of the arena
    got[0][:] = 0
    assert np.abs(dec.cache(0)[0]).max() > 0


def test_the_runtime_keeps_the_graphs_kv_order(demo):
    """One KV order: KVSpec.names(), the arena's tensors and kv_read follow the graph's own positional order of
    past inputs and present outputs (interleaved per layer), checked against the ONNX file itself, by position."""
    import onnxruntime as ort

    m, kv, table = demo
    sess = ort.InferenceSession(str(m.path("decoder.onnx")), providers=["CPUExecutionProvider"])
    past = [i.name for i in sess.get_inputs()][3:]                  # after embeddings, mask, positions
    present = [o.name for o in sess.get_outputs()][1:]              # after logits
    assert [p for p, _ in kv.names()] == past and [o for _, o in kv.names()] == present
    x = table[[5, 7, 9, 11, 2]][None].astype(kv.dtype)              # [1, S, D]
    S, H, D = x.shape[1], kv.num_kv_heads, kv.head_dim
    feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, S), np.int64),
             "position_ids": np.arange(S, dtype=np.int64)[None],
             **{n: np.zeros((1, H, 0, D), kv.dtype) for n in past}}
    graph = sess.run(present, feeds)                                # the graph's new rows, positional order
    dec = OrtDecoder(m.path("decoder.onnx"), kv, capacity=16)
    dec.prefill(x[0])
    got = dec.kv_read(S)
    assert len(got) == len(graph) == 2 * kv.num_layers
    for j, (a, b) in enumerate(zip(got, graph)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"KV tensor {j} ({present[j]})")
    assert {kv.layer_tensors(i) for i in range(kv.num_layers)} == {(present.index(kv.present_key.format(i=i)),
                                                                    present.index(kv.present_value.format(i=i)))
                                                                   for i in range(kv.num_layers)}


def test_truncate_then_extend_equals_a_fresh_prefill(demo):
    m, kv, table = demo
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    a = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    b = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    a.prefill(table[ids[:5]])
    _greedy(a, table, a.decode_one_token(table[7]), 20)             # grow the bucket past what is kept
    bucket = a.arena.bucket
    a.truncate(5)                                                    # O(1): the bucket stays, rows are masked
    assert (a.length, a.arena.bucket) == (5, bucket)
    la = a.extend(table[ids[5:]]).copy()
    lb = b.prefill(table[ids]).copy()
    np.testing.assert_allclose(la, lb, atol=1e-5)
    for (ka, va), (kb, vb) in zip(map(a.cache, range(kv.num_layers)), map(b.cache, range(kv.num_layers))):
        np.testing.assert_allclose(ka, kb, atol=1e-5)
        np.testing.assert_allclose(va, vb, atol=1e-5)
    assert _greedy(a, table, la, 6)[0] == _greedy(b, table, lb, 6)[0]


def test_extensions_longer_than_extend_max_are_chunked(demo):
    m, kv, table = demo
    a = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64, extend_max=3)
    b = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    ids = list(range(10, 30))
    a.prefill(table[ids[:4]])
    la = a.extend(table[ids[4:]]).copy()                             # 16 tokens: 6 calls of <= 3
    np.testing.assert_allclose(la, b.prefill(table[ids]), atol=1e-5)
    assert a.length == 20


def test_kv_write_restores_a_cache_into_another_decoder(demo):
    m, kv, table = demo
    a = OrtDecoder(m.path("decoder.onnx"), kv, capacity=32)
    b = OrtDecoder(m.path("decoder.onnx"), kv, capacity=32)
    la = a.prefill(table[[2, 4, 6, 8, 10, 12, 14]]).copy()
    saved = a.kv_read(7)
    a_next, _ = _greedy(a, table, la, 5)
    b.prefill(table[[1]])                                            # something else was cached
    b.kv_write(saved)
    assert b.length == 7
    assert _greedy(b, table, la, 5)[0] == a_next
    a.kv_write(a.kv_read(3))                                         # a prefix of itself
    assert a.length == 3
    with pytest.raises(ContextError, match="33 positions exceed the cache capacity 32"):
        b.kv_write([np.zeros((1, kv.num_kv_heads, 33, kv.head_dim), np.float32)] * (2 * kv.num_layers))
    with pytest.raises(ValueError, match="must be float32"):
        b.kv_write([s.astype(np.float16) for s in saved])
    with pytest.raises(ValueError, match="expected 4 KV arrays"):
        b.kv_write(saved[:3])
    with pytest.raises(ValueError, match="must be \\[1, 2, length, 16\\]"):
        b.kv_write([s[:, :1] for s in saved])
    with pytest.raises(ContextError, match="cannot read 13 positions of 12 cached"):
        b.kv_read(13)
    assert b.length == 12                                           # 7 + 5 decoded; refused writes changed nothing


# -- TensorRT: the same arena in (stand-in) device memory -------------------------------------------------

@pytest.fixture
def trt_decoder(monkeypatch, tmp_path, demo):
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    from safeclip.runtime.backends.trt import TrtDecoder

    trt, rt = install_fakes(monkeypatch, "10.3.0.30")
    m, kv, table = demo
    plan = build_plan(TARGETS["jetson"], m.graphs, m.model)["decoder"]["profiles"]
    dec = TrtDecoder(write_plan(m.path("decoder.onnx"), tmp_path / "decoder.plan", plan), kv, capacity=48)
    yield trt, rt, dec
    dec.close()
    assert rt.blocks == {}


def test_tensorrt_extends_in_one_call_through_the_extend_profile(demo, trt_decoder):
    trt, rt, dec = trt_decoder
    m, kv, table = demo
    ref = OrtDecoder(m.path("decoder.onnx"), kv, capacity=48)
    assert dec.extend_max == 48 and dec.kv_bytes == 2 * kv.num_layers * kv.num_kv_heads * 48 * kv.head_dim * 4
    ids = [7, 3, 9, 1, 4, 4, 2, 8, 6, 5]
    a, b = ref.prefill(table[ids[:4]]), dec.prefill(table[ids[:4]])
    np.testing.assert_allclose(a, b, atol=1e-5)
    for t in (11, 12, 13):
        np.testing.assert_allclose(ref.decode_one_token(table[t]), dec.decode_one_token(table[t]), atol=1e-5)
    ref.truncate(5)
    dec.truncate(5)
    runs, mallocs = trt.fake_stats["executions"], rt.mallocs
    a, b = ref.extend(table[ids[4:]]), dec.extend(table[ids[4:]])
    assert trt.fake_stats["executions"] - runs == 1                 # one call, not one per token
    assert dec.c.profile == 2 and rt.mallocs == mallocs              # the extend profile; nothing allocated
    np.testing.assert_allclose(a, b, atol=1e-5)
    for x, y in zip(ref.kv_read(11), dec.kv_read(11)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert not any(s.pending for s in rt.streams)


def test_tensorrt_kv_write_and_read_round_trip(demo, trt_decoder):
    trt, rt, dec = trt_decoder
    m, kv, table = demo
    ref = OrtDecoder(m.path("decoder.onnx"), kv, capacity=48)
    la = ref.prefill(table[[9, 8, 7, 6, 5]]).copy()
    dec.kv_write(ref.kv_read(5))
    assert dec.length == 5
    for x, y in zip(ref.kv_read(5), dec.kv_read(5)):
        np.testing.assert_array_equal(x, y)
    assert _greedy(dec, table, la, 6)[0] == _greedy(ref, table, la, 6)[0]
    with pytest.raises(ContextError, match="49 positions exceed the cache capacity 48"):
        dec.kv_write([np.zeros((1, kv.num_kv_heads, 49, kv.head_dim), np.float32)] * (2 * kv.num_layers))


@pytest.mark.cuda
def test_cuda_arena_matches_the_cpu_arena(demo):
    """ONNX Runtime's CUDA provider with the arena in device memory (cuda-python copies): a GPU machine only."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA execution provider")
    from safeclip.runtime.backends.cuda import CudaError, import_cudart
    try:
        import_cudart()
    except CudaError as e:
        pytest.skip(str(e))
    m, kv, table = demo
    cpu = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    gpu = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64, device="cuda")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    a, b = cpu.prefill(table[ids]).copy(), gpu.prefill(table[ids]).copy()
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert _greedy(cpu, table, a, 12)[0] == _greedy(gpu, table, b, 12)[0]    # through a repack (8 -> 16 -> 32)
    for x, y in zip(cpu.kv_read(20), gpu.kv_read(20)):
        np.testing.assert_allclose(x, y, atol=1e-4)
    cpu.truncate(5)
    gpu.truncate(5)
    np.testing.assert_allclose(cpu.extend(table[ids[5:]]), gpu.extend(table[ids[5:]]), atol=1e-4)
    gpu.kv_write(cpu.kv_read(8))
    for x, y in zip(cpu.kv_read(8), gpu.kv_read(8)):
        np.testing.assert_array_equal(x, y)
    gpu.close()
