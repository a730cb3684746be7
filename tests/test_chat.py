"""Conversations (runtime/chat.py): multi-turn, system prompt, images across turns, against transformers
(``apply_chat_template`` on the same history + ``generate``, greedy); KV reuse counted at the decoder; cut-back
on a differing re-render; the image cache; policies per turn; the context refusal; truncate/extend on both
decoders (TensorRT through the stand-in)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _fake_trt import install_fakes, write_plan  # noqa: E402

from safeclip.runtime.backends.base import ContextError  # noqa: E402
from safeclip.runtime.graph_spec import KVSpec  # noqa: E402
from safeclip.runtime.backends.ort import OrtDecoder  # noqa: E402
from safeclip.runtime.pipeline import Pipeline  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def setup(controlled_bundle, test_images):
    return Pipeline.load(controlled_bundle), test_images / "red.png", test_images / "blue.jpg", \
        test_images / "noise.png"


class Spy:
    """Counts the decoder's calls and the tokens each prefill/extend runs, and the vision passes."""

    def __init__(self, pipe, monkeypatch):
        self.calls, dec = [], pipe.language_model.decoder
        for name in ("prefill", "extend", "truncate"):
            real = getattr(dec, name)

            def wrap(x, _real=real, _name=name):
                self.calls.append((_name, x if _name == "truncate" else int(np.shape(x)[-2])))
                return _real(x)
            monkeypatch.setattr(dec, name, wrap)
        self.vision, real_run = 0, pipe.vision.run

        def run(*a, **k):
            self.vision += 1
            return real_run(*a, **k)
        monkeypatch.setattr(pipe.vision, "run", run)

    def take(self):
        out, self.calls = self.calls, []
        return out


def hf_generate(sources, pipe, messages, images, max_new_tokens=N):
    """The oracle: transformers' chat template over the whole history + LLaVA generate (greedy)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sources.llava_path)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<image>", "<image>" * sources.llava.config.image_seq_length)   # as LlavaProcessor
    ids = torch.tensor([tok(text).input_ids])
    kw = {}
    if images:
        kw["pixel_values"] = torch.from_numpy(np.concatenate([pipe.pixel_values(im) for im in images]))
    with torch.no_grad():
        out = sources.llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, **kw)
    return out[0, ids.shape[1]:].tolist(), ids.shape[1]


def ask(chat, text, image=None, **kw):
    s = chat.ask(text, image, max_new_tokens=kw.pop("max_new_tokens", N), **kw)
    assert "".join(s) == s.result.text
    return s


def test_multi_turn_with_system_and_images_equals_transformers_and_prefills_only_new_tokens(
        setup, demo_sources, monkeypatch):
    pipe, _, clean, noise = setup
    spy = Spy(pipe, monkeypatch)
    chat = pipe.chat(system="You are a careful assistant.")
    turns = [("What is in the picture?", clean), ("And the colours?", None), ("Compare with this one.", noise)]
    images, prev_prompt = [], 0
    for i, (text, image) in enumerate(turns):
        s = ask(chat, text, image)
        images += [image] if image is not None else []
        ref, prompt_len = hf_generate(demo_sources, pipe, chat.history[:-1], images)
        assert list(s.result.token_ids) == ref and s.result.prompt_tokens == prompt_len, f"turn {i}"
        calls = spy.take()
        if i == 0:
            assert calls == [("prefill", prompt_len)] and s.result.cached_tokens == 0
        else:       # the previous prompt is reused; only what follows the common prefix runs
            cached = s.result.cached_tokens
            assert cached >= prev_prompt and s.timings["prefill_tokens"] == prompt_len - cached
            assert [c for c in calls if c[0] != "truncate"] == [("extend", prompt_len - cached)]
        prev_prompt = prompt_len
    assert [v.flagged for v in s.result.verdicts] == [False, False] and spy.vision == 2
    j = s.result.to_json()
    assert [v["flagged"] for v in j["verdicts"]] == [False, False] and j["cached_tokens"] == s.result.cached_tokens
    assert chat.history[0] == {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]}
    assert [m["role"] for m in chat.history] == ["system"] + ["user", "assistant"] * 3
    chat.reset()
    assert len(chat.history) == 1


def test_a_differing_re_render_cuts_back_to_the_first_differing_token(setup, monkeypatch):
    """A template that renders the last user turn differently from earlier ones: the cache is cut back to
    where the re-rendered turn differs, and the answer equals a full prefill's."""
    pipe, _, clean, _ = setup
    lm = pipe.language_model
    monkeypatch.setattr(lm, "template", lm.template.replace("{{ message['role'].upper() + ': '}}",
                        "{{ message['role'].upper() + (' (now): ' if loop.last else ': ') }}"))
    spy = Spy(pipe, monkeypatch)
    chat = pipe.chat()
    ask(chat, "What is in the picture?", clean)
    spy.take()
    s = ask(chat, "Tell me more.")
    calls = spy.take()
    cut = [c[1] for c in calls if c[0] == "truncate"]
    assert cut and cut[0] < s.result.prompt_tokens and s.result.cached_tokens == cut[0]
    ids = chat._tokens(chat._turns[0])[0]               # the first turn as it re-renders now
    assert cut[0] < ids.size                             # cut inside the first turn: USER (now) -> USER
    fresh = pipe.chat()                                  # the same history, cache invalidated: full prefill
    fresh._turns = chat._turns[:1]
    pipe.language_model.owner = None
    again = ask(fresh, "Tell me more.")
    assert again.result.cached_tokens == 0 and again.result.token_ids == s.result.token_ids


def test_image_cache_no_second_vision_pass_and_bounded(setup, monkeypatch):
    pipe, _, clean, noise = setup
    spy = Spy(pipe, monkeypatch)
    first = ask(pipe.chat(), "What is in the picture?", clean.read_bytes())
    before = spy.vision
    again = ask(pipe.chat(), "What is in the picture?", clean)           # a path with the same bytes
    assert spy.vision == before and again.timings["image_cache_hits"] == 1
    assert again.result.token_ids == first.result.token_ids and again.verdict == first.verdict
    from safeclip.runtime.chat import ImageCache
    small = ImageCache(max_bytes=pipe.image_cache._items[next(iter(pipe.image_cache._items))].features.nbytes)
    monkeypatch.setattr(pipe, "_image_cache", small)
    ask(pipe.chat(), "Hi", clean, max_new_tokens=2)
    ask(pipe.chat(), "Hi", noise, max_new_tokens=2)
    assert small.stats()["entries"] == 1 and small.bytes <= small.max_bytes        # LRU: the older one left


def test_instruct_turn_carries_the_instruction_after_its_image(setup, demo_sources):
    pipe, toxic, clean, _ = setup
    chat = pipe.chat()
    ask(chat, "What is in the picture?", clean, policy="instruct")
    s = ask(chat, "And this one?", toxic, policy="instruct")
    assert s.result.action == "instructed" and s.verdict.flagged and s.verdict.category == "gun"
    user = chat.history[2]["content"]
    assert user == [{"type": "image"}, {"type": "text", "text": pipe.instruction_for("gun")},
                    {"type": "text", "text": "And this one?"}]
    ref, _ = hf_generate(demo_sources, pipe, chat.history[:-1], [clean, toxic])
    assert list(s.result.token_ids) == ref
    assert [v.flagged for v in s.result.verdicts] == [False, True]
    follow = ask(chat, "Why?")                                           # the instruction stays in the history
    assert chat.history[2]["content"][1]["text"] == pipe.instruction_for("gun")
    assert list(follow.result.token_ids) == hf_generate(demo_sources, pipe, chat.history[:-1], [clean, toxic])[0]


def test_one_route_and_one_render_per_turn_a_second_only_when_the_gate_adds_an_instruction(setup, monkeypatch):
    """Pipeline.stream is a one-turn conversation (Chat.ask's route, its lease); a turn renders the conversation
    through the template once, and a second time only when a newly gated image puts a safety instruction in."""
    from safeclip.runtime.chat import ChatStream
    from safeclip.runtime.lease import DecoderLease

    pipe, toxic, clean, _ = setup
    lm, renders = pipe.language_model, []
    real = lm.render
    monkeypatch.setattr(lm, "render", lambda messages: renders.append(messages) or real(messages))
    pipe.image_cache.clear()
    s = pipe.stream(clean, "What is in the picture?", max_new_tokens=2)
    assert isinstance(s, ChatStream) and isinstance(s.lease, DecoderLease) and len(renders) == 1
    assert "".join(s) == s.result.text and s.result.token_ids
    chat, renders[:] = pipe.chat(), []
    ask(chat, "What is in the picture?", clean, max_new_tokens=2, policy="instruct")
    assert len(renders) == 1                                      # clean: no instruction, one render
    renders.clear()
    s = ask(chat, "And this one?", toxic, max_new_tokens=2, policy="instruct")
    instruction = {"type": "text", "text": pipe.instruction_for("gun")}
    assert s.result.action == "instructed" and len(renders) == 2      # the gate ran after the first render
    assert instruction not in renders[0][-1]["content"] and instruction in renders[1][-1]["content"]
    renders.clear()
    again = pipe.chat()                                           # the flagged image is cached now: its verdict
    ask(again, "And this one?", toxic, max_new_tokens=2, policy="instruct")    # is known before the render
    assert len(renders) == 1 and instruction in renders[0][-1]["content"]


def test_refuse_and_annotate_per_turn(setup, monkeypatch):
    pipe, toxic, clean, _ = setup
    chat = pipe.chat()
    ask(chat, "What is in the picture?", clean, policy="refuse")          # a clean image is answered
    spy = Spy(pipe, monkeypatch)
    s = ask(chat, "And this?", toxic, policy="refuse")
    assert s.result.action == "refused" and s.result.text == pipe.refusal_for("gun") and spy.calls == []
    assert chat.history[-1] == {"role": "assistant", "content": [{"type": "text", "text": pipe.refusal_for("gun")}]}
    later = ask(chat, "Tell me about it anyway.", policy="annotate")      # the refused image is still there
    assert later.result.action == "refused" and later.verdict.category == "gun" and spy.calls == []
    other = pipe.chat()
    a = ask(other, "What is in the picture?", toxic, policy="annotate")
    assert a.result.action == "annotated" and a.verdict.flagged and [v.flagged for v in a.result.verdicts] == [True]
    assert spy.take()[0][0] in ("prefill", "extend")


def test_history_beyond_the_context_is_refused_before_any_work(controlled_bundle, test_images, monkeypatch):
    pipe = Pipeline.load(controlled_bundle, context=700)               # one image (576) and a little text
    chat = pipe.chat()
    ask(chat, "What is in the picture?", test_images / "blue.jpg", max_new_tokens=4)
    spy = Spy(pipe, monkeypatch)
    history = chat.history
    with pytest.raises(ContextError, match=r"conversation of \d+ tokens .* exceeds the context capacity of 700"):
        chat.ask("And this one?", test_images / "noise.png")
    assert spy.vision == 0 and spy.calls == [] and chat.history == history
    with pytest.raises(ValueError, match="empty"):
        chat.ask("  ")


def test_stale_chat_stream_rebuilds_after_another_request(setup):
    pipe, _, clean, _ = setup
    chat = pipe.chat()
    ask(chat, "What is in the picture?", clean)
    s = chat.ask("Say more.", max_new_tokens=N)
    it = iter(s)
    next(it)
    pipe.generate(None, "Hi", max_new_tokens=3)                        # another request overwrites the cache
    list(it)
    solo = pipe.chat()
    solo._turns = chat._turns[:1]
    pipe.language_model.owner = None
    assert ask(solo, "Say more.").result.token_ids == s.result.token_ids


def _check_truncate_extend(dec, ref, table):
    rng = np.random.default_rng(1)
    prompt = table[rng.integers(0, table.shape[0], 20)]
    dec.prefill(prompt)
    for t in (3, 4, 5):
        dec.decode_one_token(table[t])
    dec.truncate(12)                                                   # keep 12, then a different tail
    assert dec.length == 12
    tail = table[rng.integers(0, table.shape[0], 7)]
    got = np.array(dec.extend(tail))
    want = np.array(ref.prefill(np.concatenate([prompt[:12], tail])))
    assert np.allclose(got, want, atol=1e-5), np.abs(got - want).max()
    got, want = np.array(dec.decode_one_token(table[9])), np.array(ref.decode_one_token(table[9]))
    assert np.allclose(got, want, atol=1e-5) and dec.length == ref.length == 20
    with pytest.raises(ContextError, match="cannot truncate 20 cached positions to 21"):
        dec.truncate(21)


def test_truncate_and_extend_on_both_decoders(demo_bundle_traced, monkeypatch, tmp_path):
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    from safeclip.runtime.backends.trt import TrtDecoder
    from safeclip.runtime.manifest import load_manifest

    m = load_manifest(demo_bundle_traced)
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    table = np.load(m.path(m.data["embeddings"]["file"]))
    ref = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    _check_truncate_extend(OrtDecoder(m.path("decoder.onnx"), kv, capacity=64), ref, table)
    install_fakes(monkeypatch, "10.3.0.30")
    profiles = build_plan(TARGETS["jetson"], m.graphs, m.model)["decoder"]["profiles"]
    dec = TrtDecoder(write_plan(demo_bundle_traced / "decoder.onnx", tmp_path / "decoder.plan", profiles), kv, capacity=64)
    assert dec.takes(0, 7) and dec.takes(12, 1) and dec.takes(12, 7)       # jetson: prefill, decode, extend profiles
    assert dec.extend_max == 64                                             # an extension is one call
    _check_truncate_extend(dec, ref, table)
    dec.close()


# -- a real-layout template: llava-v1.6-mistral on a tiny Mistral-shaped model with the real Mistral vocabulary --
from test_real_vocab import _hf_model, _processor, bundles, checkpoints, clip_dir  # noqa: E402,F401


def test_mistral_template_multi_turn_equals_transformers(bundles, test_images, monkeypatch):
    from PIL import Image

    pipe, folder, _ = bundles("mistral-v1")
    proc, model = _processor(str(folder)), _hf_model(str(folder))
    spy = Spy(pipe, monkeypatch)
    chat = pipe.chat(system="Answer in one short sentence.")
    red, noise = (Image.open(test_images / n).convert("RGB") for n in ("red.png", "noise.png"))
    images = []
    for i, (text, image) in enumerate([("What is in the picture?", red), ("Why?", None), ("And here?", noise)]):
        s = ask(chat, text, image, policy="annotate", max_new_tokens=10)
        images += [image] if image is not None else []
        prompt = proc.apply_chat_template(chat.history[:-1], add_generation_prompt=True, tokenize=False)
        ref_in = proc(text=prompt, images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ref_in, max_new_tokens=10, do_sample=False)
        ref = out[0, ref_in["input_ids"].shape[1]:].tolist()
        assert list(s.result.token_ids) == ref and s.result.prompt_tokens == ref_in["input_ids"].shape[1], i
        calls = spy.take()
        if i:                               # reused: one extension of the new tokens only
            assert s.result.cached_tokens > 0 and [c for c in calls if c[0] != "truncate"] == \
                [("extend", s.result.prompt_tokens - s.result.cached_tokens)]
