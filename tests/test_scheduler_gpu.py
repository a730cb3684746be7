"""Continuous batching off the CPU: the device arena's slot moves, ``TrtSlotDecoder`` on the TensorRT stand-in
(tests/_fake_trt.py: shapes inside the active profile, 256-byte aligned addresses, copies inside one
allocation, stream order, no output overlapping a bound tensor), and, on a lent GPU (``cuda`` marker), the
CUDA provider's ``SlotDecoder``.

Oracles: the host arena for the device arena's moves (byte-equal); one-sequence decoders run on each sequence
for the batched logits and KV rows (the demo bundle is fp32: 1e-5); one-sequence ``generate`` for the
scheduler's tokens (greedy: token-exact; sampling: the same seed, the same tokens).
"""
from __future__ import annotations

import numpy as np
import pytest

from _fake_trt import FakeCudart, install_fakes, write_plan
from safeclip.export.bundle import build_plan
from safeclip.export.targets import TARGETS
from safeclip.runtime import generate as G
from safeclip.runtime.backends.arena import DeviceArena, HostArena
from safeclip.runtime.backends.base import BackendError, ContextError
from safeclip.runtime.graph_spec import KVSpec
from safeclip.runtime.backends.cuda import CudaRuntime
from safeclip.runtime.backends.ort import OrtDecoder
from safeclip.runtime.backends.pick import slot_decoder as sharing
from safeclip.runtime.backends.slots import SlotDecoder, kv_slot_bytes
from safeclip.runtime.scheduler import Scheduler
from safeclip.runtime.manifest import load_manifest

CAP = 64


# -- the device arena's slot moves against the host arena's -----------------------------------------------
def test_device_arena_slot_moves_equal_the_host_arena():
    rt = FakeCudart()
    cuda = CudaRuntime(rt)
    stream = cuda.stream()
    T, H, D, C, S = 4, 2, 8, 40, 3
    dev = DeviceArena(cuda, stream, T, H, D, C, np.float32, slots=S, align=4)
    host = HostArena(T, H, D, C, np.float32, slots=S, align=4)
    assert dev.capacity == host.capacity == 40 and dev.slab == S * H * 40 * D
    rng = np.random.default_rng(0)
    scratch = cuda.malloc(T * H * C * D * 4)
    ptrs = [scratch + j * H * C * D * 4 for j in range(T)]
    stage = cuda.host_array(T * H * C * D, np.float32)
    lengths = np.zeros(S, np.int64)

    def upload(new):                                     # new [T, rows, D] -> each tensor's device scratch
        rows = new.shape[1]
        for j in range(T):
            stage[: rows * D] = new[j].reshape(-1)
            cuda.h2d(ptrs[j], stage, rows * D * 4, stream)
            cuda.sync(stream)

    def both(fn_host, fn_dev, need):
        for a in (host, dev):
            a.ensure(int(lengths.max()), need)
        assert host.bucket == dev.bucket and host.bucket % 4 == 0          # aligned buckets
        fn_host()
        fn_dev()

    for s, n in ((0, 5), (1, 11), (2, 2)):                                # prefills of different lengths
        new = rng.standard_normal((T, H, n, D)).astype(np.float32)
        upload(new.reshape(T, H * n, D))
        lengths[s] = 0
        both(lambda: host.place(s, 0, new), lambda: dev.place_from(s, 0, ptrs, n), n)
        lengths[s] = n
    copies = []
    for _ in range(28):                                                   # steps: buckets grow 16 -> 32 -> 40
        new = rng.standard_normal((T, S * H, D)).astype(np.float32)
        upload(new)
        P = lengths.copy()
        both(lambda: host.scatter(P, new), lambda: copies.append(dev.scatter_from(P, ptrs)), int(P.max()) + 1)
        lengths += 1
    assert copies == [T * S] * 28                                        # three lengths: three runs per tensor
    both(lambda: host.move_slot(2, 0, int(lengths[2])), lambda: dev.move_slot(2, 0, int(lengths[2])), 1)
    lengths[0], lengths[2] = lengths[2], 0
    lengths[1] = lengths[0]                                               # two slots at one length: one run
    new = rng.standard_normal((T, 2 * H, D)).astype(np.float32)
    upload(new)
    P = lengths[:2].copy()
    both(lambda: host.scatter(P, new), lambda: copies.append(dev.scatter_from(P, ptrs)), int(P.max()) + 1)
    assert copies[-1] == T
    host_pin = cuda.host_array(H * C * D, np.float32)
    for s in range(S):
        for a, b in zip(host.read_slot(s, int(lengths[s]) + 1), dev.read_slot(s, int(lengths[s]) + 1, host_pin)):
            np.testing.assert_array_equal(a, b)
    cuda.release()


# -- TensorRT: TrtSlotDecoder on the stand-in ----------------------------------------------------------------
@pytest.fixture
def trt_env(demo_bundle_traced, monkeypatch, tmp_path):
    """The demo bundle's decoder as a stand-in plan with the jetson target's profiles (max_batch 4), a
    one-sequence TrtDecoder on it, the embedding table and a CPU oracle factory."""
    from safeclip.runtime.backends.trt import TrtDecoder

    trt, rt = install_fakes(monkeypatch, "10.3.0.30")
    m = load_manifest(demo_bundle_traced)
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])

    def plan(max_batch=None):
        profiles = build_plan(TARGETS["jetson"], m.graphs, m.model, max_batch=max_batch)["decoder"]["profiles"]
        return write_plan(demo_bundle_traced / "decoder.onnx", tmp_path / f"decoder-{max_batch}.plan", profiles)

    dec = TrtDecoder(plan(), kv, capacity=CAP)
    table = np.load(m.path(m.data["embeddings"]["file"]))
    env = {"trt": trt, "rt": rt, "m": m, "kv": kv, "dec": dec, "table": table, "plan": plan,
           "solo": lambda: OrtDecoder(m.path("decoder.onnx"), kv, capacity=CAP)}
    yield env
    dec.close()


def _prompts(table, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, table.shape[0], n) for n in lengths]


def test_tensorrt_batched_steps_equal_each_sequence_alone(trt_env):
    e = trt_env
    trt, rt, table = e["trt"], e["rt"], e["table"]
    dec = sharing(e["dec"], 3)
    assert type(dec).__name__ == "TrtSlotDecoder" and dec.max_batch == 4 and dec.align == 2
    assert dec.kv_bytes == 3 * kv_slot_bytes(e["kv"], CAP)
    prompts = _prompts(table, (5, 13, 7))                               # odd lengths: aligned buckets matter
    solo = [e["solo"]() for _ in prompts]
    first = [dec.prefill(i, table[p]) for i, p in enumerate(prompts)]
    for s, p, f in zip(solo, prompts, first):
        np.testing.assert_allclose(f, s.prefill(table[p]), atol=1e-5, rtol=0)
    tokens = [int(np.argmax(f)) for f in first]
    mallocs, execs = rt.mallocs, trt.fake_stats["executions"]
    T = 2 * e["kv"].num_layers
    for step in range(20):                                              # buckets grow past 16 and 32
        before = dec.decode_copies
        logits = dec.decode(table[tokens]).copy()
        assert dec.decode_copies - before == T * 3                      # three lengths: one copy per tensor each
        assert dec.c.profile == 1                                       # the one decode profile
        for i, s in enumerate(solo):
            np.testing.assert_allclose(logits[i], s.decode_one_token(table[tokens[i]]), atol=1e-5, rtol=0)
        tokens = [int(np.argmax(row)) for row in logits]
    assert trt.fake_stats["executions"] - execs == 20                   # one execution per step, all three in it
    assert rt.mallocs == mallocs                                        # nothing allocated per step
    assert list(dec.lengths) == [25, 33, 27] and dec.arena.bucket % dec.align == 0
    for i, s in enumerate(solo):
        for got, ref in zip(dec.slot_read(i), s.kv_read(s.length)):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    dec.move(2, 0)                                                      # slot 0 leaves, 2 takes its place
    dec.free(2)
    joined = _prompts(table, (9,), seed=4)[0]                           # a new sequence joins in slot 1's wake
    dec.move(1, 1)
    assert list(dec.lengths) == [27, 33, 0]
    new_first = dec.prefill(2, table[joined])
    ref_new = e["solo"]()
    np.testing.assert_allclose(new_first, ref_new.prefill(table[joined]), atol=1e-5, rtol=0)
    toks = [tokens[2], tokens[1], int(np.argmax(new_first))]
    logits = dec.decode(table[toks])
    for row, s, t in zip(logits, (solo[2], solo[1], ref_new), toks):
        np.testing.assert_allclose(row, s.decode_one_token(table[t]), atol=1e-5, rtol=0)
    switches = trt.fake_stats["profile_switches"]
    B1 = dec.decode(table[[toks[0]]])                                   # one sequence: the same decode profile
    B2 = dec.decode(table[toks[:2]])                                    # and two again: no switch either way
    assert dec.c.profile == 1 and B1.shape == (1, dec.vocab_size) and B2.shape == (2, dec.vocab_size)
    assert trt.fake_stats["profile_switches"] == switches
    dec.close()


def test_tensorrt_extend_binds_a_slots_block_aligned_and_chunks_at_the_extend_profile(trt_env):
    e = trt_env
    table = e["table"]
    dec = sharing(e["dec"], 2)
    a, b = _prompts(table, (7, 41), seed=3)
    dec.prefill(0, table[a])                                            # bucket 16
    dec.prefill(1, table[b[:37]])                                       # bucket 38: 37 rounded up to 2 rows
    assert dec.arena.bucket == 38
    dec.extend(1, table[b[37:39]])                                      # slot 1's past at its block: 256-aligned
    last = dec.extend(1, table[b[39:]])                                 # (unaligned 37 rows would be 4736 bytes)
    np.testing.assert_allclose(last, e["solo"]().prefill(table[b]), atol=1e-5, rtol=0)
    assert list(dec.lengths) == [7, 41]
    for got, ref in zip(dec.slot_read(1), _kv_after(e, b)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    dec.close()


def _kv_after(e, ids):
    s = e["solo"]()
    s.prefill(e["table"][ids])
    return s.kv_read(len(ids))


def test_tensorrt_slots_beyond_the_profile_are_refused_with_the_rebuild(trt_env):
    from safeclip.runtime.backends.trt import TrtDecoder

    e = trt_env
    with pytest.raises(BackendError, match="profiles batch at most 4 sequences per decode step, not 5: lower "
                                           "--max-batch, or re-export with --max-batch 5 and rebuild"):
        sharing(e["dec"], 5)
    one = TrtDecoder(e["plan"](1), e["kv"], capacity=CAP)               # exported with --max-batch 1
    assert one.max_batch == 1
    with pytest.raises(BackendError, match="at most 1 sequences"):
        sharing(one, 2)
    assert sharing(one, 1).max_batch == 1                               # one slot: the batch-1 decode profile
    one.close()
    with pytest.raises(ContextError, match="capacity 4096 is outside the 1..2048 tokens"):
        sharing(e["dec"], 2, capacity=4096)


def test_tensorrt_scheduler_is_token_exact_with_joins_leaves_and_sampling(trt_env):
    e = trt_env
    table = e["table"]
    from safeclip.runtime.pipeline import Pipeline

    pipe = Pipeline.load(e["m"].root, context=CAP)                      # the tokenizer and EOS ids
    lm = pipe.language_model
    prompts = _prompts(table, (3, 30, 9, 17, 5, 12))
    budgets = [20, 6, 30, 11, 25, 9]
    solo = [G.generate(lm.decoder, table, table[p], tokenizer=lm.tokenizer, max_new_tokens=n,
                       eos_token_ids=lm.eos_ids) for p, n in zip(prompts, budgets)]
    sched = Scheduler(sharing(e["dec"], 3), table)
    try:
        streams = [sched.submit(table[p], tokenizer=lm.tokenizer, max_new_tokens=n, eos_token_ids=lm.eos_ids)
                   for p, n in zip(prompts, budgets)]
        for s, ref in zip(streams, solo):
            text = "".join(s)
            assert s.result.token_ids == ref.token_ids and text == ref.text
        seeded = dict(temperature=0.9, top_p=0.95, max_new_tokens=12, eos_token_ids=lm.eos_ids)
        refs = [G.generate(lm.decoder, table, table[p], tokenizer=lm.tokenizer, seed=40 + i, **seeded)
                for i, p in enumerate(prompts[:3])]
        streams = [sched.submit(table[p], tokenizer=lm.tokenizer, seed=40 + i, **seeded)
                   for i, p in enumerate(prompts[:3])]
        for s, ref in zip(streams, refs):
            "".join(s)
            assert s.result.token_ids == ref.token_ids
        assert sched.stats()["mean_batch"] > 1
    finally:
        sched.close()


# -- the CUDA provider on a lent GPU ---------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_slot_decoder_equals_the_cpu_one(demo_bundle_traced):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)")
    m = load_manifest(demo_bundle_traced)
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    table = np.load(m.path(m.data["embeddings"]["file"]))
    one = OrtDecoder(m.path("decoder.onnx"), kv, capacity=CAP, device="cuda")
    gpu, cpu = SlotDecoder.sharing(one, 3), SlotDecoder(m.path("decoder.onnx"), kv, capacity=CAP, slots=3)
    prompts = _prompts(table, (5, 13, 7))
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(gpu.prefill(i, table[p]), cpu.prefill(i, table[p]), atol=1e-4, rtol=0)
    tokens = [1, 2, 3]
    for _ in range(20):
        a, b = gpu.decode(table[tokens]).copy(), cpu.decode(table[tokens]).copy()
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        tokens = [int(np.argmax(r)) for r in b]
    gpu.move(2, 0)
    cpu.move(2, 0)
    for x, y in zip(gpu.slot_read(0), cpu.slot_read(0)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
    gpu.close()
    one.close()


def test_tensorrt_slot_write_restores_a_prefix_and_decoding_goes_on_as_alone(trt_env):
    e = trt_env
    table = e["table"]
    dec = sharing(e["dec"], 2)
    a, b = _prompts(table, (11, 23), seed=7)
    dec.prefill(0, table[a])
    solo = e["solo"]()
    solo.prefill(table[b])
    dec.slot_write(1, solo.kv_read(15))                                 # a cached 15-token prefix of b
    assert list(dec.lengths) == [11, 15]
    last = dec.extend(1, table[b[15:]])                                 # the rest prefilled on top
    ref = e["solo"]()
    np.testing.assert_allclose(last, ref.prefill(table[b]), atol=1e-5, rtol=0)
    t = [int(np.argmax(dec.decode(table[[1, 2]])[1]))]
    np.testing.assert_allclose(dec.decode(table[[3, t[0]]])[1], (ref.decode_one_token(table[2]),
                                                                  ref.decode_one_token(table[t[0]]))[1],
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected 4 KV arrays"):
        dec.slot_write(0, solo.kv_read(3)[:2])
    dec.close()


def test_the_real_cuda_backing_runs_the_backend_as_device_check_does(demo_bundle_traced, tmp_path):
    """scripts/device_check.sh drives TrtDecoder/TrtSlotDecoder's real cuda-python paths on a lent GPU with the
    stand-in engine over ``RealCudaBacking`` (device memory read and written with cuda-python copies). Here the
    backing runs over FakeCudart, so its own copies are checked like the backend's; the results must match."""
    from _fake_trt import RealCudaBacking, fake_tensorrt
    from safeclip.runtime.backends.trt import TrtDecoder

    m = load_manifest(demo_bundle_traced)
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    table = np.load(m.path(m.data["embeddings"]["file"]))
    rt = FakeCudart()
    trt = fake_tensorrt(RealCudaBacking(rt))
    profiles = build_plan(TARGETS["jetson"], m.graphs, m.model)["decoder"]["profiles"]
    dec = TrtDecoder(write_plan(demo_bundle_traced / "decoder.onnx", tmp_path / "d.plan", profiles), kv, capacity=CAP,
                     trt=trt, cuda=CudaRuntime(rt))
    ref = OrtDecoder(m.path("decoder.onnx"), kv, capacity=CAP)
    p = _prompts(table, (9,))[0]
    np.testing.assert_allclose(dec.prefill(table[p]), ref.prefill(table[p]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(dec.decode_one_token(table[4]), ref.decode_one_token(table[4]), atol=1e-5, rtol=0)
    slots = sharing(dec, 2)
    solo = [OrtDecoder(m.path("decoder.onnx"), kv, capacity=CAP) for _ in range(2)]
    for i, q in enumerate(_prompts(table, (5, 12), seed=2)):
        np.testing.assert_allclose(slots.prefill(i, table[q]), solo[i].prefill(table[q]), atol=1e-5, rtol=0)
    out = slots.decode(table[[7, 8]])
    for i, t in enumerate((7, 8)):
        np.testing.assert_allclose(out[i], solo[i].decode_one_token(table[t]), atol=1e-5, rtol=0)
    assert trt.fake_stats["executions"] == 5
    slots.close()
    dec.close()


def test_tensorrt_capacity_off_the_alignment_runs_to_its_last_position(trt_env):
    """A capacity that is no multiple of the aligned rows: buckets reach it rounded up (63 -> 64 here)."""
    e = trt_env
    table = e["table"]
    dec = sharing(e["dec"], 3, capacity=63)
    assert dec.capacity == 63 and dec.arena.capacity == 64
    solo = [OrtDecoder(e["m"].path("decoder.onnx"), e["kv"], capacity=63) for _ in range(3)]
    prompts = _prompts(table, (45, 3, 20), seed=9)
    toks = []
    for i, (s, p) in enumerate(zip(solo, prompts)):
        dec.prefill(i, table[p])
        toks.append(int(np.argmax(s.prefill(table[p]))))
    for _ in range(63 - 45):                                            # slot 0 reaches the capacity
        out = dec.decode(table[toks])
        refs = [s.decode_one_token(table[t]) for s, t in zip(solo, toks)]
        for o, r in zip(out, refs):
            np.testing.assert_allclose(o, r, atol=1e-5, rtol=0)
        toks = [int(np.argmax(r)) for r in refs]
    assert dec.lengths[0] == 63 and dec.arena.bucket == 64
    with pytest.raises(ContextError, match="63 cached \\+ 1 new token exceed the cache capacity 63"):
        dec.decode(table[toks])
    dec.close()
