"""``Decoder.kv_read`` / ``kv_write`` (the server's prefix cache, runtime/prefix_cache.py) on both decoders: a
snapshot restored into a fresh decoder continues exactly as the original (logits equal ONNX Runtime's prefill of
the whole sequence), a shorter read is a prefix, and bad snapshots are refused (capacity, count, shape, dtype).
TensorRT runs through the strict stand-in (tests/_fake_trt.py: pinned host memory, stream order)."""
from __future__ import annotations

import numpy as np
import pytest

from _fake_trt import install_fakes, write_plan
from safeclip.runtime.backends.base import ContextError
from safeclip.runtime.backends.ort import OrtDecoder


@pytest.fixture(scope="module")
def parts(demo_decoder_parts):
    return demo_decoder_parts


def _trt(m, demo_bundle_traced, tmp_path, monkeypatch, kv, capacity):
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    from safeclip.runtime.backends.trt import TrtDecoder

    install_fakes(monkeypatch, "10.3.0.30")
    profiles = build_plan(TARGETS["jetson"], m.graphs, m.model)["decoder"]["profiles"]
    return TrtDecoder(write_plan(demo_bundle_traced / "decoder.onnx", tmp_path / "decoder.plan", profiles), kv,
                      capacity=capacity)


def _check(make, m, kv, table):
    rng = np.random.default_rng(7)
    ref = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    src, dst = make(), make()
    prompt = table[rng.integers(0, table.shape[0], 15)]
    src.prefill(prompt)
    src.decode_one_token(table[5])                                   # 16 cached: prompt + one decoded token
    snap = src.kv_read(16)
    L, H, D = kv.num_layers, kv.num_kv_heads, kv.head_dim
    assert len(snap) == 2 * L and all(a.shape == (1, H, 16, D) and a.dtype == np.dtype(kv.dtype) for a in snap)
    if hasattr(src, "cache"):                                          # CPU ORT: the very arrays of the cache
        k0, v0 = src.cache(0)
        assert np.array_equal(snap[0], k0) and np.array_equal(snap[1], v0)    # layer 0's key, then its value
    short = src.kv_read(9)
    assert all(np.array_equal(s, a[:, :, :9]) for s, a in zip(short, snap))
    dst.prefill(table[rng.integers(0, table.shape[0], 30)])          # something else, longer, to overwrite
    dst.kv_write(snap)
    assert dst.length == 16
    tail = table[[11, 12, 13]]
    want = np.array(ref.prefill(np.concatenate([prompt, table[[5]], tail])))
    got = np.array(dst.extend(tail))
    assert np.allclose(got, want, atol=1e-5), np.abs(got - want).max()
    got, want = np.array(dst.decode_one_token(table[2])), np.array(ref.decode_one_token(table[2]))
    assert np.allclose(got, want, atol=1e-5) and dst.length == ref.length == 20
    dst.kv_write(short)                                              # a prefix, then the rest prefilled
    got = np.array(dst.extend(np.concatenate([prompt[9:], table[[5]], tail])))
    want = np.array(ref.prefill(np.concatenate([prompt, table[[5]], tail])))
    assert np.allclose(got, want, atol=1e-5) and dst.length == 19
    assert dst.kv_read(0)[0].shape == (1, H, 0, D)
    with pytest.raises(ContextError, match="cannot read 20 positions of 19 cached"):
        dst.kv_read(20)
    big = [np.zeros((1, H, 65, D), kv.dtype) for _ in range(2 * L)]
    with pytest.raises(ContextError, match="65 positions exceed the cache capacity 64"):
        dst.kv_write(big)
    with pytest.raises(ValueError, match=f"expected {2 * L} KV arrays"):
        dst.kv_write(snap[:-1])
    bad = list(snap)
    bad[1] = bad[1][:, :, :8]
    with pytest.raises(ValueError, match="KV arrays have different shapes"):
        dst.kv_write(bad)
    bad[1] = snap[1].astype(np.float16)
    with pytest.raises(ValueError, match="KV arrays must be float32, got .*float16"):
        dst.kv_write(bad)
    assert dst.length == 19                                          # a refused snapshot changes nothing
    for d in (src, dst):
        getattr(d, "close", lambda: None)()


def test_ort_round_trip_and_errors(parts):
    m, kv, table = parts
    _check(lambda: OrtDecoder(m.path("decoder.onnx"), kv, capacity=64), m, kv, table)


def test_trt_round_trip_and_errors(parts, demo_bundle_traced, tmp_path, monkeypatch):
    m, kv, table = parts
    _check(lambda: _trt(m, demo_bundle_traced, tmp_path, monkeypatch, kv, 64), m, kv, table)


def test_prefix_cache_longest_prefix_lru_by_bytes_and_covered_entries():
    from safeclip.runtime.prefix_cache import PrefixCache

    def kv(n, fill):                                  # 2 arrays [1, 1, n, 2] float32: 16 bytes a position
        return [np.full((1, 1, n, 2), fill, np.float32) for _ in range(2)]

    per = lambda n: 8 * n + 16 * n                    # noqa: E731  keys (int64) + KV bytes
    pc = PrefixCache(per(10) + per(6))
    assert pc.match([1, 2, 3], 3) == (0, None) and pc.stats()["misses"] == 1
    assert pc.put([1, 2, 3, 4], kv(4, 1.0)) and pc.put([1, 2, 3, 4, 5, 6], kv(6, 2.0))
    assert pc.stats()["entries"] == 1 and pc.bytes == per(6)          # the first is a prefix of the second
    assert pc.covers([1, 2, 3]) and not pc.covers([1, 2, 9])
    n, arrays = pc.match([1, 2, 3, 4, 7, 8], 5)
    assert n == 4 and arrays[0].shape == (1, 1, 4, 2) and np.all(arrays[0] == 2.0)   # cut at the first difference
    assert pc.match([1, 2, 3, 4, 5, 6, 7], 3)[0] == 3                 # never past the limit
    assert pc.put([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], kv(10, 3.0))        # fits next to the 6-entry
    assert pc.stats()["entries"] == 2
    pc.match([1, 2], 2)                                               # the 6-entry is now most recently used
    assert pc.put([5] * 10, kv(10, 4.0))                              # evicts the least recently used (9, 8, ...)
    assert pc.match([9, 8, 7], 3) == (0, None) and pc.match([1, 2, 3], 3)[0] == 3
    assert pc.bytes <= pc.max_bytes and not pc.put(list(range(20)), kv(20, 5.0))   # larger than the budget
    s = pc.stats()
    assert (s["entries"], s["hits"], s["misses"], s["reused_tokens"]) == (2, 4, 2, 4 + 3 + 2 + 3)
    assert not PrefixCache(0).enabled and not PrefixCache(0).put([1], kv(1, 0.0))
    with pytest.raises(ValueError, match="non-negative"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="KV arrays of"):
        pc.put([1, 2], kv(3, 0.0))
