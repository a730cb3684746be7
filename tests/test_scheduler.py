"""Continuous batching (runtime/scheduler.py over backends/slots.py) on the demo model.

Oracle: each sequence generated alone by the one-sequence path (``generate.generate`` on an ``OrtDecoder``):
batched greedy output must be token-exact, batched sampling with a seed must give the same tokens as that
seed alone; the slot decoder's logits and KV rows at B > 1 with different lengths against a one-sequence
decoder run on each sequence.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from safeclip.runtime import generate as G
from safeclip.runtime.backends.base import ContextError
from safeclip.runtime.backends.ort import OrtDecoder
from safeclip.runtime.backends.ort_shared import SharedKVDecoder, SharedSlotDecoder
from safeclip.runtime.backends.pick import slot_decoder
from safeclip.runtime.backends.slots import kv_slot_bytes
from safeclip.runtime.scheduler import QueueFull, Scheduler, SequenceError
from safeclip.runtime.pipeline import Pipeline

CAP = 96


@pytest.fixture(scope="module")
def lm(demo_bundle):
    pipe = Pipeline.load(demo_bundle, context=CAP)
    return pipe.language_model


@pytest.fixture(scope="module", params=["fused", "traced"])
def any_lm(request):
    """The demo bundle's language model with the cpu target's fused decoder (KV form "shared") and with the
    traced one (KV form "new"), and its bundle folder."""
    bundle = request.getfixturevalue("demo_bundle" if request.param == "fused" else "demo_bundle_traced")
    return Pipeline.load(bundle, context=CAP).language_model, bundle


def _alone(lm, bundle, capacity):
    """A one-sequence decoder of the same form as ``lm.decoder`` on its own session."""
    cls = SharedKVDecoder if isinstance(lm.decoder, SharedKVDecoder) else OrtDecoder
    return cls(bundle / "decoder.onnx", lm.decoder.kv, capacity=capacity, names=lm.decoder.names)


def _prompts(lm, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, lm.table.shape[0], n) for n in lengths]


def _solo(lm, ids, **kw):
    kw.setdefault("eos_token_ids", lm.eos_ids)
    return G.generate(lm.decoder, lm.table, lm.table[ids], tokenizer=lm.tokenizer, **kw)


def _sched(lm, slots, **kw):
    return Scheduler(slot_decoder(lm.decoder, slots), lm.table, **kw)


def _submit(sched, lm, ids, tokenizer=None, **kw):
    kw.setdefault("eos_token_ids", lm.eos_ids)
    return sched.submit(lm.table[ids], tokenizer=tokenizer or lm.tokenizer, **kw)


def _drain(stream):
    return "".join(stream)


def _hold(sched, delay_s: float = 0.0) -> threading.Event:
    """Decode steps wait for the returned event (set it once every request is submitted, so the batch does not
    depend on how fast this thread submits) and then take at least ``delay_s`` each."""
    go, step = threading.Event(), sched.dec.decode

    def held(x):
        go.wait(30)
        time.sleep(delay_s)
        return step(x)

    sched.dec.decode = held
    return go


# -- the slot decoder ----------------------------------------------------------------------------------------
def test_a_batched_step_over_different_lengths_equals_each_sequence_alone(any_lm):
    lm, bundle = any_lm
    dec = slot_decoder(lm.decoder, 3, capacity=64)
    prompts = _prompts(lm, (4, 13, 7))
    solo = [_alone(lm, bundle, 64) for _ in prompts]
    first = [dec.prefill(i, lm.table[p]).copy() for i, p in enumerate(prompts)]
    for s, p, f in zip(solo, prompts, first):
        np.testing.assert_array_equal(s.prefill(lm.table[p]), f)        # the same B = 1 call
    tokens = [int(np.argmax(f)) for f in first]
    for _ in range(20):                                                 # buckets grow past 16 and 32 on the way
        logits = dec.decode(lm.table[tokens]).copy()
        for i, s in enumerate(solo):
            ref = s.decode_one_token(lm.table[tokens[i]])
            np.testing.assert_allclose(logits[i], ref, atol=1e-5, rtol=0)
        tokens = [int(np.argmax(row)) for row in logits]
    assert list(dec.lengths) == [24, 33, 27]
    assert isinstance(dec, SharedSlotDecoder) or dec.arena.bucket >= 33
    for i, s in enumerate(solo):
        for got, ref in zip(dec.slot_read(i), s.kv_read(s.length)):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    dec.move(2, 0)                                                      # slot 0 leaves, 2 takes its place
    assert list(dec.lengths) == [27, 33, 0]
    for got, ref in zip(dec.slot_read(0), solo[2].kv_read(27)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    logits = dec.decode(lm.table[[tokens[2], tokens[1]]])
    np.testing.assert_allclose(logits[0], solo[2].decode_one_token(lm.table[tokens[2]]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1], solo[1].decode_one_token(lm.table[tokens[1]]), atol=1e-5, rtol=0)
    assert dec.kv_bytes == 3 * kv_slot_bytes(dec.kv, 64)


def test_chunked_prefill_of_one_slot_equals_a_whole_prefill(any_lm):
    lm, _ = any_lm
    dec = slot_decoder(lm.decoder, 2, capacity=64)
    a, b = _prompts(lm, (9, 30), seed=3)
    dec.prefill(0, lm.table[a])
    dec.prefill(1, lm.table[b[:10]])
    dec.extend(1, lm.table[b[10:20]])
    last = dec.extend(1, lm.table[b[20:]]).copy()
    np.testing.assert_allclose(last, lm.decoder.prefill(lm.table[b]), atol=1e-5, rtol=0)
    assert list(dec.lengths) == [9, 30]


def test_slot_decoder_refuses_bad_calls(any_lm):
    lm, _ = any_lm
    dec = slot_decoder(lm.decoder, 2, capacity=16)
    with pytest.raises(ContextError, match="17 new tokens exceed the cache capacity 16"):
        dec.prefill(0, lm.table[np.arange(17)])
    with pytest.raises(ValueError, match="slot 1 holds no sequence"):
        dec.prefill(0, lm.table[[3, 4]]) is None or dec.decode(lm.table[[1, 2]])
    with pytest.raises(ValueError, match="slot 2 outside 0..1"):
        dec.prefill(2, lm.table[[3]])
    with pytest.raises(TypeError, match="runs sequences in slots"):
        dec.decode_one_token(lm.table[1])


# -- the scheduler: batched == alone -----------------------------------------------------------------------
def test_greedy_batched_is_token_exact_with_mixed_lengths_joins_and_leaves(lm):
    prompts = _prompts(lm, (3, 30, 9, 17, 5, 12, 22))
    budgets = [24, 6, 40, 13, 30, 9, 18]                                # leaves at different steps
    solo = [_solo(lm, p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    sched = _sched(lm, 3)                                               # 7 requests, 3 slots: joins as slots free
    go = _hold(sched)
    try:
        streams = [_submit(sched, lm, p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
        go.set()
        texts = [_drain(s) for s in streams]
        for s, t, ref in zip(streams, texts, solo):
            assert s.result.token_ids == ref.token_ids and t == ref.text == s.result.text
            assert s.result.finish_reason == ref.finish_reason
        st = sched.stats()
        assert st["running"] == st["waiting"] == 0 and 2 < st["mean_batch"] <= 3
    finally:
        sched.close()


def test_sampling_batched_gives_each_seed_its_tokens_alone(lm):
    prompts = _prompts(lm, (6, 19, 11, 4), seed=1)
    kw = [dict(temperature=0.9, top_k=40, seed=7), dict(temperature=1.2, top_p=0.9, seed=8),
          dict(temperature=0.7, seed=7), dict()]                         # the last greedy, in the same batch
    solo = [_solo(lm, p, max_new_tokens=25, **k) for p, k in zip(prompts, kw)]
    sched = _sched(lm, 4)
    try:
        streams = [_submit(sched, lm, p, max_new_tokens=25, **k) for p, k in zip(prompts, kw)]
        for s, ref in zip(streams, solo):
            _drain(s)
            assert s.result.token_ids == ref.token_ids
        assert solo[0].token_ids != solo[2].token_ids                    # the seeds' samplers are each their own
    finally:
        sched.close()


def test_stop_strings_are_per_sequence(lm):
    a, b = _prompts(lm, (8, 14), seed=2)
    free = _solo(lm, a, max_new_tokens=30)
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 2]     # a stop string this answer reaches
    assert stop.strip()
    ref_a = _solo(lm, a, max_new_tokens=30, stop_strings=[stop])
    ref_b = _solo(lm, b, max_new_tokens=30)
    sched = _sched(lm, 2)
    try:
        sa = _submit(sched, lm, a, max_new_tokens=30, stop_strings=[stop])
        sb = _submit(sched, lm, b, max_new_tokens=30)
        assert _drain(sa) == ref_a.text and sa.result.finish_reason == "stop"
        assert _drain(sb) == ref_b.text and sb.result.token_ids == ref_b.token_ids
    finally:
        sched.close()


def test_cancelled_sequence_leaves_and_its_slot_is_reused(lm):
    prompts = _prompts(lm, (5, 9, 14, 7), seed=4)
    solo = [_solo(lm, p, max_new_tokens=40) for p in prompts]
    sched = _sched(lm, 2)
    _hold(sched, 0.02).set()                                            # 40 steps take 0.8 s: time to cancel
    try:
        s0, s1 = (_submit(sched, lm, p, max_new_tokens=40) for p in prompts[:2])
        it = iter(s1)
        got = [next(it), next(it)]                                      # two pieces, then the client goes away
        s1.cancel()
        s2 = _submit(sched, lm, prompts[2], max_new_tokens=40)           # takes the freed slot
        assert _drain(s0) == solo[0].text and s0.result.token_ids == solo[0].token_ids
        assert _drain(s2) == solo[2].text and s2.result.token_ids == solo[2].token_ids
        text = "".join(got) + "".join(it)                               # what was queued before it left
        assert solo[1].text.startswith(text) and s1.result.finish_reason == "cancelled"
        assert len(s1.result.token_ids) < len(solo[1].token_ids)
        del it, s1
        s3 = _submit(sched, lm, prompts[3], max_new_tokens=40)           # a dropped, unfinished stream
        iter(s3).__next__()
        del s3                                                           # frees its slot at the next step
        s4 = _submit(sched, lm, prompts[3], max_new_tokens=40)
        assert _drain(s4) == solo[3].text
        assert sched.stats()["running"] == 0
    finally:
        sched.close()


class _Exploding:
    """A tokenizer whose decode raises after ``after`` calls (one sequence's detokenization failing)."""

    def __init__(self, tok, after: int):
        self.tok, self.after, self.calls = tok, after, 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        if self.calls > self.after:
            raise UnicodeError("bad bytes in this sequence")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_an_error_in_one_sequence_ends_that_sequence_only(lm):
    prompts = _prompts(lm, (6, 10, 15), seed=5)
    solo = [_solo(lm, p, max_new_tokens=30) for p in prompts]
    sched = _sched(lm, 3)
    seen = []

    def on_token(token, piece):
        seen.append(token)
        if len(seen) == 4:
            raise KeyError("callback bug")

    try:
        good = _submit(sched, lm, prompts[0], max_new_tokens=30)
        bad = _submit(sched, lm, prompts[1], max_new_tokens=30, tokenizer=_Exploding(lm.tokenizer, 9))
        bad_cb = _submit(sched, lm, prompts[2], max_new_tokens=30, on_token=on_token)
        with pytest.raises(SequenceError, match="bad bytes in this sequence"):
            _drain(bad)
        with pytest.raises(SequenceError, match="callback bug"):
            _drain(bad_cb)
        assert _drain(good) == solo[0].text and good.result.token_ids == solo[0].token_ids
        again = _submit(sched, lm, prompts[1], max_new_tokens=30)          # the batch goes on
        assert _drain(again) == solo[1].text
    finally:
        sched.close()


def test_a_prompt_that_cannot_fit_is_refused_before_joining(lm):
    sched = _sched(lm, 2, max_waiting=1)
    try:
        with pytest.raises(ContextError, match=f"prompt of {CAP + 1} tokens exceeds the context capacity of {CAP}"):
            _submit(sched, lm, np.arange(CAP + 1) % 200 + 5, max_new_tokens=4)
        assert sched.stats()["waiting"] == 0 and sched.stats()["running"] == 0
        full = _submit(sched, lm, np.arange(CAP) % 200 + 5, max_new_tokens=50)   # fits: 1 token of room
        _drain(full)
        assert len(full.result.token_ids) == 1 and full.result.finish_reason in ("context", "eos")
    finally:
        sched.close()


def test_the_waiting_list_is_bounded(lm):
    sched = _sched(lm, 1, max_waiting=2)
    gate = threading.Event()

    def slow(token, piece):                                             # holds the one slot
        gate.wait(10)

    try:
        first = _submit(sched, lm, [5, 6, 7], max_new_tokens=3, on_token=slow)
        for _ in range(500):                                            # the scheduler took it (and is held)
            if sched.stats()["waiting"] == 0:
                break
            threading.Event().wait(0.01)
        waiting = [_submit(sched, lm, [8, 9], max_new_tokens=2) for _ in range(2)]
        with pytest.raises(QueueFull, match="2 requests are waiting \\(the most is 2\\)"):
            _submit(sched, lm, [8, 9], max_new_tokens=2)
        assert sched.stats()["waiting"] == 2
        gate.set()
        for s in [first, *waiting]:
            _drain(s)
    finally:
        gate.set()
        sched.close()


def test_refused_image_never_takes_a_slot_and_answers_match_unbatched(controlled_bundle, test_images):
    pipe = Pipeline.load(controlled_bundle)
    blue, red = test_images / "blue.jpg", test_images / "red.png"
    ref = pipe.generate(blue, "What is in the picture?", max_new_tokens=12)
    ref_red = pipe.generate(red, "What is in the picture?", policy="instruct", max_new_tokens=12)
    sched = pipe.enable_batching(2)
    try:
        refused = pipe.stream(red, "What is in the picture?", policy="refuse")
        assert refused.action == "refused" and sched.stats()["waiting"] == sched.stats()["running"] == 0
        assert "".join(refused) == refused.result.text and sched.steps == 0
        a = pipe.stream(blue, "What is in the picture?", max_new_tokens=12)
        b = pipe.stream(red, "What is in the picture?", policy="instruct", max_new_tokens=12)
        assert "".join(a) == ref.text and a.result.token_ids == ref.token_ids
        assert b.action == "instructed" and "".join(b) == ref_red.text and b.result.token_ids == ref_red.token_ids
        assert sched.steps > 0
    finally:
        sched.close()


def test_chunked_prefill_joins_between_steps_and_stays_token_exact(lm):
    prompts = _prompts(lm, (5, 41, 23), seed=6)
    solo = [_solo(lm, p, max_new_tokens=30) for p in prompts]
    sched = _sched(lm, 3, prefill_chunk=8)                           # 41 tokens: 6 chunks between decode steps
    try:
        streams = [_submit(sched, lm, p, max_new_tokens=30) for p in prompts]
        for s, ref in zip(streams, solo):
            assert _drain(s) == ref.text and s.result.token_ids == ref.token_ids
        assert sched.steps < sum(len(r.token_ids) for r in solo)      # they did decode together
    finally:
        sched.close()
    with pytest.raises(ValueError, match="prefill_chunk must be positive"):
        _sched(lm, 1, prefill_chunk=0)


def test_a_failing_graph_call_ends_its_sequences_and_the_scheduler_goes_on(lm):
    a, b = _prompts(lm, (7, 12), seed=8)
    sched = _sched(lm, 2)
    go = _hold(sched)
    step, calls = sched.dec.decode, []

    def once_broken(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return step(x)

    sched.dec.decode = once_broken
    try:
        sa, sb = (_submit(sched, lm, p, max_new_tokens=30) for p in (a, b))
        go.set()
        for s in (sa, sb):
            with pytest.raises(SequenceError, match="device lost"):
                _drain(s)
        assert calls[2] == 2                                           # the failed step held both
        assert sched.stats()["running"] == 0 and not sched.dec.lengths.any()
        again = _submit(sched, lm, a, max_new_tokens=30)
        assert _drain(again) == _solo(lm, a, max_new_tokens=30).text
    finally:
        sched.close()
    with pytest.raises(RuntimeError, match="the scheduler is closed"):
        _submit(sched, lm, a, max_new_tokens=3)


def test_conversation_turns_join_the_batch_and_keep_their_history(controlled_bundle, test_images):
    pipe = Pipeline.load(controlled_bundle)
    blue = test_images / "blue.jpg"
    ref = pipe.chat(system="Be brief.")
    r1 = "".join(ref.ask("What is this?", image=blue, max_new_tokens=10))
    r2 = "".join(ref.ask("And the colour?", max_new_tokens=10))
    sched = pipe.enable_batching(2)
    try:
        chat = pipe.chat(system="Be brief.")
        assert "".join(chat.ask("What is this?", image=blue, max_new_tokens=10)) == r1
        s2 = chat.ask("And the colour?", max_new_tokens=10)
        other = pipe.stream(None, "Hi", max_new_tokens=10)                # decodes in the same batch
        assert "".join(s2) == r2 and "".join(other) == other.result.text
        assert chat.history == ref.history and s2.result.cached_tokens == 0
        assert sched.steps > 0
    finally:
        sched.close()


def test_batched_turns_reuse_and_feed_the_prefix_cache(controlled_bundle, test_images):
    """Under batching a turn restores the longest prefix the prefix cache holds into its slot and prefills only
    the rest; a finished turn is snapshotted there. Oracle: the same conversation unbatched, no cache."""
    from safeclip.runtime.prefix_cache import PrefixCache

    pipe = Pipeline.load(controlled_bundle)
    blue = test_images / "blue.jpg"
    turns = [("What is this?", blue), ("And the colour?", None), ("Why?", None)]
    ref = pipe.chat(system="Be brief.")
    want = ["".join(ref.ask(q, image=im, max_new_tokens=12)) for q, im in turns]
    pc = PrefixCache(64 << 20)
    sched = pipe.enable_batching(3)
    try:
        chat = pipe.chat(system="Be brief.", prefix_cache=pc)
        got, cached = [], []
        for q, im in turns:
            s = chat.ask(q, image=im, max_new_tokens=12)
            other = pipe.stream(None, "Hi", max_new_tokens=8)              # decodes in the same batch
            got.append("".join(s))
            "".join(other)
            cached.append(s.result.cached_tokens)
        assert got == want and chat.history == ref.history
        assert cached[0] == 0 and cached[1] > 500 and cached[2] > cached[1]   # the image's 576 positions and more
        assert pc.stats()["entries"] >= 1 and pc.stats()["hits"] == 2
        # a stateless client re-sending the history (a new Chat on the same cache) reuses it too
        again = pipe.chat(system="Be brief.", prefix_cache=pc)
        again.set_history([(turns[0][0], [blue], want[0]), (turns[1][0], [], want[1])])
        s = again.ask(turns[2][0], max_new_tokens=12)
        assert "".join(s) == want[2] and s.result.cached_tokens > cached[2]   # turn 3 itself was snapshotted
    finally:
        sched.close()
