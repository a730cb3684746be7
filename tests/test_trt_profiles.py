"""The optimization profiles export/targets.py makes cover every shape the runtime asks for.

The runtime (generate.TextStream and chat.py over OrtDecoder or TrtDecoder) asks, at batch 1, for a prefill of
S tokens on an empty cache (S = 1..capacity); one-token decode steps whose bound past is the KV arena's bucket
(runtime/backends/arena.py: at least the cached length, at most the capacity, so any of 0..capacity); and
extensions of S = 2..EXTEND_MAX tokens on a bucket of 1..capacity rows (chat follow-up turns); with continuous
batching (runtime/backends/slots.py) also one-token steps of B = 2..max_batch sequences on every bucket; the
vision graph gets one view per image (LLaVA-1.5) or base + tiles (LLaVA-NeXT). The oracle is a brute
force over every length with ``select_profile`` on the full input shapes, independent of
``plan_capacity``'s interval arithmetic, which the tests then compare with it.
"""
from __future__ import annotations

import math

import pytest

from safeclip.export.memory import MODELS
from safeclip.export.targets import TARGETS, VOLUME_LIMIT
from safeclip.runtime.backends.trt_build import validate_profiles
from safeclip.runtime.anyres import max_views
from safeclip.runtime.backends.trt import decoder_shapes, plan_capacity
from safeclip.runtime.backends.arena import EXTEND_MAX
from safeclip.runtime.backends.trt_plan import (ProfileSelectionError, plan_batch, plan_extend, plan_prefill,
                                                select_profile)
from safeclip.runtime.graph_spec import KVSpec

BUILT = [t for t in TARGETS.values() if t.build_engines != "never"]


def dims(name):
    """(hidden, KVSpec, context) of the demo model or a table model."""
    if name == "demo":
        return 64, KVSpec(2, 2, 16, "float16"), 2048
    t = MODELS[name]["text_config"]
    return (t["hidden_size"], KVSpec(t["num_hidden_layers"], t["num_key_value_heads"],
                                     t["hidden_size"] // t["num_attention_heads"], "float16"),
            t["max_position_embeddings"])


def covered(profiles, shapes) -> int | None:
    try:
        return select_profile(profiles, shapes)
    except ProfileSelectionError:
        return None


@pytest.mark.parametrize("tgt", BUILT, ids=lambda t: t.name)
def test_every_runtime_shape_of_the_demo_lies_in_a_profile(tgt):
    H, kv, ctx = dims("demo")
    profiles = tgt.decoder_profiles(H, kv.num_layers, kv.num_kv_heads, kv.head_dim, ctx)
    assert len(validate_profiles(profiles)) == 3                     # well-formed for the builder
    C = min(tgt.context, ctx)                                          # the capacity the runtime will use
    chunk, E = tgt.chunks(H // kv.head_dim, C)
    assert chunk == min(tgt.prefill_chunk, C) and E == min(EXTEND_MAX, chunk, C)
    for S in range(1, chunk + 1):                                      # every first chunk of a prompt
        k = covered(profiles, decoder_shapes(kv, H, 0, S))
        assert k is not None, f"prefill of {S} tokens not covered"
        assert S == 1 or k == 0                                        # prompts take the prefill profile
    assert covered(profiles, decoder_shapes(kv, H, 0, chunk + 1)) is None   # longer prompts go on in chunks
    N = tgt.max_batch
    for B in range(1, N + 1):                                          # every decode step: every batch ...
        for Lb in range(0, C + 1):                                     # ... on every bucket, one profile
            k = covered(profiles, decoder_shapes(kv, H, Lb, 1, batch=B))
            assert k is not None, f"step of {B} on a bucket of {Lb} not covered"
            assert (B, Lb) == (1, 0) or k == 1, f"step of {B} on {Lb} took profile {k}"
    for Lb in range(1, C + 1):                                         # extensions: every bucket ...
        for S in (2, E):
            assert covered(profiles, decoder_shapes(kv, H, Lb, S)) == 2, f"extend of {S} on {Lb} not covered"
    for S in range(2, E + 1):                                          # ... and every length at the edges
        for Lb in (1, 2, C // 2, C - 1, C):
            assert covered(profiles, decoder_shapes(kv, H, Lb, S)) == 2, f"extend of {S} on {Lb} not covered"
    assert covered(profiles, decoder_shapes(kv, H, C + 1, 1)) is None  # nothing beyond the capacity
    assert covered(profiles, decoder_shapes(kv, H, 1, E + 1)) is None
    assert covered(profiles, decoder_shapes(kv, H, 0, 1, batch=N + 1)) is None
    assert covered(profiles, decoder_shapes(kv, H, C + 1, 1, batch=N)) is None
    for S, P in ((2, 0), (2, 1), (E, C)):                              # prefill/extend stay one sequence's
        assert covered(profiles, decoder_shapes(kv, H, P, S, batch=2)) is None
    assert plan_prefill(profiles, kv, H) == chunk
    assert plan_capacity(profiles, kv, H) == C and plan_extend(profiles, kv, H, C, EXTEND_MAX) == E
    assert plan_batch(profiles, kv, H, C) == N


@pytest.mark.parametrize("tgt", BUILT, ids=lambda t: t.name)
@pytest.mark.parametrize("max_batch", [1, 2, 7])
def test_export_max_batch_sizes_the_decode_profile(tgt, max_batch):
    """One decode profile for batch 1..max_batch: a batch that grows or shrinks never switches profiles."""
    H, kv, ctx = dims("demo")
    profiles = tgt.decoder_profiles(H, kv.num_layers, kv.num_kv_heads, kv.head_dim, ctx, max_batch=max_batch)
    assert len(profiles) == 3
    C = min(tgt.context, ctx)
    assert plan_batch(profiles, kv, H, C) == max_batch
    assert {covered(profiles, decoder_shapes(kv, H, C // 3, 1, batch=B)) for B in range(1, max_batch + 1)} == {1}
    with pytest.raises(ValueError, match="--max-batch must be 1..256, got 0"):
        tgt.decoder_profiles(H, kv.num_layers, kv.num_kv_heads, kv.head_dim, ctx, max_batch=0)


def scores(shapes, heads) -> int:
    """Elements of the attention scores [B, H, S, P+S] of a call with these input shapes."""
    B, S, _ = shapes["inputs_embeds"]
    return B * heads * S * shapes["attention_mask"][1]


@pytest.mark.parametrize("tgt", BUILT, ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(MODELS))
def test_no_profile_of_a_real_model_reaches_tensorrts_volume_limit(tgt, name):
    """TensorRT refuses a network whose tensors reach 2^31 elements at a profile's max (NvInfer.h, 10.3); the
    largest is the attention scores (test_demo_graphs_largest_tensor_is_the_attention_scores). The datacenter
    target's unchunked 8192-token prefill reached it for every 32-head model: 32 x 8192 x 8192 = 2^31."""
    H, kv, ctx = dims(name)
    heads = MODELS[name]["text_config"]["num_attention_heads"]
    for tgt_max_batch in (tgt.max_batch, 16):
        for p in tgt.decoder_profiles(H, kv.num_layers, kv.num_kv_heads, kv.head_dim, ctx, max_batch=tgt_max_batch):
            at_max = {n: s["max"] for n, s in p.items()}
            assert scores(at_max, heads) < VOLUME_LIMIT
            assert all(math.prod(s) < VOLUME_LIMIT for s in at_max.values())


def test_demo_graphs_largest_tensor_is_the_attention_scores(demo_decoder_parts):
    """The bound above, checked on a real exported graph by shape inference (the TensorRT stand-in's sizes):
    at the prefill and extend profiles' max shapes the largest tensor is B*H*S*(P+S)."""
    from _fake_trt_shapes import max_shapes, tensor_volumes

    m, kv, _ = demo_decoder_parts
    g = m.decoder
    hidden = g.inputs[g.names.inputs_embeds].shape[-1]
    heads = hidden // kv.head_dim                                      # the demo's query heads (4)
    prefill, _, extend = TARGETS["jetson"].decoder_profiles(hidden, kv.num_layers, kv.num_kv_heads, kv.head_dim, 1024,
                                                           kv=kv, names=g.names)
    for p in (prefill, extend):
        shapes = max_shapes(p)
        vols = tensor_volumes(m.path(g.file), shapes)
        assert max(vols.values()) == scores(shapes, heads), sorted(vols.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("tgt", BUILT, ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_are_covered_up_to_the_target_context(tgt, name):
    H, kv, ctx = dims(name)
    profiles = tgt.decoder_profiles(H, kv.num_layers, kv.num_kv_heads, kv.head_dim, ctx)
    C = min(tgt.context, ctx)
    assert plan_capacity(profiles, kv, H) == C
    chunk, _ = tgt.chunks(MODELS[name]["text_config"]["num_attention_heads"], C)
    assert plan_prefill(profiles, kv, H) == chunk
    for S in sorted({2, chunk // 2, chunk}):                           # a prompt's first chunk
        assert covered(profiles, decoder_shapes(kv, H, 0, S)) == 0
    for P in sorted({0, 1, C // 2, C - 2, C - 1, C}):
        assert covered(profiles, decoder_shapes(kv, H, P, 1)) is not None
        assert P == 0 or covered(profiles, decoder_shapes(kv, H, P, min(EXTEND_MAX, C))) == 2
    if ctx > tgt.context:                                              # a documented limit, not a gap:
        assert C == tgt.context < ctx                                  # TrtDecoder caps its capacity here


def vision_plan(tgt, anyres=None):
    """The vision profile bundle.build_plan writes for a 336-px tower (LLaVA-1.5, or anyres with pinpoints)."""
    from safeclip.export.bundle import build_plan
    graphs = {"vision_gate": {"inputs": {"pixel_values": {"shape": ["batch", 3, 336, 336]}}}}
    pre = {"anyres": {"grid_pinpoints": anyres, "tile_size": 336}} if anyres else None
    (prof,) = build_plan(tgt, graphs, {}, pre)["vision_gate"]["profiles"]
    return prof


@pytest.mark.parametrize("tgt", BUILT, ids=lambda t: t.name)
def test_vision_profile_covers_llava_1_5_views(tgt):
    prof = vision_plan(tgt)
    assert covered([prof], {"pixel_values": (1, 3, 336, 336)}) is not None      # one view per image


@pytest.mark.parametrize("tgt", BUILT, ids=lambda t: t.name)
def test_vision_profile_covers_every_llava_next_view_count(tgt):
    pins = MODELS["llava-v1.6-mistral-7b"]["image_grid_pinpoints"]
    counts = sorted({1 + (h // 336) * (w // 336) for h, w in pins})            # base view + the grid's tiles
    assert counts == [3, 4, 5] and max_views(pins, 336) == 5
    prof = vision_plan(tgt, pins)
    assert covered([prof], {"pixel_values": (5, 3, 336, 336)}) is not None
    for views in counts:
        assert covered([prof], {"pixel_values": (views, 3, 336, 336)}) is not None, f"{views} views"


def test_datacenter_batch_profiles_are_what_the_runtime_runs():
    """The TensorRT vision session sizes its buffers for the largest shape a profile allows, so no datacenter
    profile goes beyond one image's views (the vision graph) or one sequence (the decoder's prefill and extend);
    only the decode profile batches, one token per sequence."""
    tgt = TARGETS["datacenter"]
    pins = MODELS["llava-v1.6-mistral-7b"]["image_grid_pinpoints"]
    assert vision_plan(tgt)["pixel_values"]["max"][0] == 1
    assert vision_plan(tgt, pins)["pixel_values"]["max"][0] == max_views(pins, 336) == 5
    H, kv, ctx = dims("llava-v1.6-mistral-7b")
    prefill, batched, extend = tgt.decoder_profiles(H, kv.num_layers, kv.num_kv_heads, kv.head_dim, ctx)
    for prof in (prefill, extend):
        assert {spec["max"][0] for spec in prof.values()} == {1}, f"{tgt.name}: a one-sequence profile batches"
    assert {spec["max"][0] for spec in batched.values()} == {tgt.max_batch} == {16}
    assert batched["inputs_embeds"]["max"][1] == 1                     # one token per sequence
