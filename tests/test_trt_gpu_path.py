"""The GPU path as a Jetson runs it (issue #22), on the strict TensorRT stand-in (``_fake_trt.py``):

* chunked prefill: a prompt longer than the prefill profile goes on through the extend profile, and greedy
  decoding stays token-exact against transformers' ``generate()``;
* context memory: the execution context is created ``ON_PROFILE_CHANGE``, so a decode step holds the decode
  profile's activation memory, not the prefill chunk's (the default ``STATIC`` keeps the maximum over all
  profiles for the process's life); an out-of-memory profile switch is one ``BackendError`` line;
* ``set_optimization_profile_async`` raises ``RuntimeError`` in the real bindings, never returns False;
* closing the one-sequence decoder leaves the context and stream its ``TrtSlotDecoder`` still uses.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _fake_trt import install_fakes, plan_memory, write_plan
from _lm_models import exported

from safeclip.export.targets import TARGETS
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.backends.trt import TrtDecoder, TrtSlotDecoder
from safeclip.runtime.contract import DecoderGraph


@pytest.fixture(scope="module")
def lm():
    e = exported(2, "float32")
    g = DecoderGraph.from_json(e.frag["graphs"]["decoder"])
    table = np.load(e.bundle / e.frag["embeddings"]["file"])
    return e, g, table


def plan_for(lm, tmp_path, chunk=8, **target):
    e, g, _ = lm
    tgt = dataclasses.replace(TARGETS["jetson"], prefill_chunk=chunk, **target)
    hidden = g.inputs[g.names.inputs_embeds].shape[-1]
    profiles = tgt.decoder_profiles(hidden, g.kv.num_layers, g.kv.num_kv_heads, g.kv.head_dim, 128, kv=g.kv,
                                    names=g.names)
    return write_plan(e.bundle / g.file, tmp_path / "decoder.plan", profiles), profiles


def greedy(dec, table, ids, n):
    logits, out = dec.prefill(table[ids]), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = dec.decode_one_token(table[out[-1]])
    return out


def test_prompts_longer_than_a_chunk_are_token_exact_against_transformers(lm, tmp_path, monkeypatch):
    trt, rt = install_fakes(monkeypatch)
    e, g, table = lm
    plan, _ = plan_for(lm, tmp_path, chunk=8)
    dec = TrtDecoder(plan, g.kv, capacity=96, names=g.names)
    assert (dec.prefill_max, dec.extend_max) == (8, 8)
    ids = np.random.default_rng(7).integers(5, table.shape[0], 29).tolist()
    runs = trt.fake_stats["executions"]
    got = greedy(dec, table, ids, 12)
    assert trt.fake_stats["executions"] - runs == 4 + 12                # 8 + 8 + 8 + 5 prompt tokens, 12 steps
    with torch.no_grad():
        ref = e.model.generate(input_ids=torch.tensor(ids)[None], max_new_tokens=12, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long), eos_token_id=None)
    assert got == ref[0, len(ids):].tolist()
    dec.close()


def test_a_slot_prompt_longer_than_a_chunk_is_chunked_too(lm, tmp_path, monkeypatch):
    trt, rt = install_fakes(monkeypatch)
    e, g, table = lm
    plan, _ = plan_for(lm, tmp_path, chunk=8)
    one = TrtDecoder(plan, g.kv, capacity=96, names=g.names)
    ids = np.random.default_rng(3).integers(5, table.shape[0], 21).tolist()
    ref = greedy(one, table, ids, 6)
    slots = TrtSlotDecoder.sharing(one, 2)
    assert slots.prefill_max == 8
    runs = trt.fake_stats["executions"]
    logits, got = slots.prefill(1, table[ids]), []
    assert trt.fake_stats["executions"] - runs == 3                      # 8 + 8 + 5
    for _ in range(6):
        got.append(int(np.argmax(logits)))
        logits = slots.extend(1, table[[got[-1]]])
    assert got == ref


def test_a_decode_step_holds_the_decode_profiles_activation_memory_not_the_prefills(lm, tmp_path, monkeypatch):
    trt, rt = install_fakes(monkeypatch)
    e, g, table = lm
    plan, profiles = plan_for(lm, tmp_path, chunk=128)
    act, weights = plan_memory(e.bundle / g.file, profiles)
    assert act[0] > 3 * act[1]                                           # a prefill chunk's scores dwarf a step's
    dec = TrtDecoder(plan, g.kv, capacity=128, names=g.names)
    dec.prefill(table[list(range(5, 105))])
    assert trt.fake_stats["context_memory"] == act[0]
    dec.decode_one_token(table[3])
    assert trt.fake_stats["context_memory"] == act[1]                    # STATIC would hold max(act) for ever
    assert sum(rt.reserved.values()) == weights + act[1]
    dec.close()


def test_an_out_of_memory_profile_switch_is_one_backend_error(lm, tmp_path, monkeypatch):
    e, g, table = lm
    plan, profiles = plan_for(lm, tmp_path, chunk=128)
    act, weights = plan_memory(e.bundle / g.file, profiles)
    trt, rt = install_fakes(monkeypatch)
    dec = TrtDecoder(plan, g.kv, capacity=128, names=g.names)
    rt.limit = rt.used() - act[0] + act[1] + 1024                         # room for a step's activations only
    dec.reset(4)
    dec.decode_one_token(table[3])                                       # the decode profile fits
    with pytest.raises(BackendError, match=r"refused to switch decoder.plan to profile 0 \(Error in set optimization "
                                           r"profile async.; out of device memory") as err:
        dec.prefill(table[list(range(5, 40))])
    assert "\n" not in str(err.value)
    dec.close()


def test_closing_the_decoder_leaves_the_context_its_slot_decoder_shares(lm, tmp_path, monkeypatch):
    trt, rt = install_fakes(monkeypatch)
    e, g, table = lm
    plan, _ = plan_for(lm, tmp_path)
    one = TrtDecoder(plan, g.kv, capacity=64, names=g.names)
    slots = TrtSlotDecoder.sharing(one, 2)
    ref = TrtDecoder(plan, g.kv, capacity=64, names=g.names)
    one.close()                                                          # the slot decoder still runs
    a = slots.prefill(0, table[[5, 6, 7]])
    np.testing.assert_allclose(a, ref.prefill(table[[5, 6, 7]]), atol=1e-5, rtol=0)
    b = slots.decode(table[[int(np.argmax(a))]])
    np.testing.assert_allclose(b[0], ref.decode_one_token(table[int(np.argmax(a))]), atol=1e-5, rtol=0)
    live = [s for s in rt.streams if not s.destroyed]
    slots.close()                                                        # the last user destroys it
    assert len([s for s in rt.streams if not s.destroyed]) == len(live) - 1
    ref.close()
