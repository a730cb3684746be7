"""Gated generation through the Pipeline, against transformers' LlavaForConditionalGeneration.generate.

The bundle's gate is controlled (descriptor embeddings made to point at chosen images) so that one image is
flagged as 'gun' and another is clean; the language model is the demo's, exported through the normal path.
"""
import json

import pytest

torch = pytest.importorskip("torch")

from safeclip.runtime import run as run_cli
from safeclip.runtime.backends.base import ContextError
from safeclip.runtime.pipeline import Pipeline


N = 32


@pytest.fixture(scope="module")
def setup(controlled_bundle, test_images):
    return Pipeline.load(controlled_bundle), controlled_bundle, test_images / "red.png", test_images / "blue.jpg"


def hf_generate(sources, pipe, image, prompt, instruction=None, max_new_tokens=N):
    """The oracle: transformers' tokenizer + chat template + LLaVA generate (greedy)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sources.llava_path)
    content = ([{"type": "image"}] if image is not None else []) + \
              ([{"type": "text", "text": instruction}] if instruction else []) + [{"type": "text", "text": prompt}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    n = sources.llava.config.image_seq_length
    text = text.replace("<image>", "<image>" * n)                       # what LlavaProcessor does
    ids = torch.tensor([tok(text).input_ids])
    kw = {}
    if image is not None:
        kw["pixel_values"] = torch.from_numpy(pipe.pixel_values(image))
    with torch.no_grad():
        out = sources.llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, **kw)
    return out[0, ids.shape[1]:].tolist(), ids.shape[1]


@pytest.mark.parametrize("prompt", ["What is in the picture?", "Describe the colours. Be brief."])
def test_instruct_on_flagged_image_equals_hf_with_instruction(setup, demo_sources, prompt):
    pipe, _, toxic, _ = setup
    a = pipe.generate(toxic, prompt, policy="instruct", max_new_tokens=N)
    assert a.verdict.flagged and a.verdict.category == "gun" and a.action == "instructed"
    instruction = pipe.instruction_for("gun")
    assert "gun" in instruction
    ref, prompt_len = hf_generate(demo_sources, pipe, toxic, prompt, instruction)
    assert list(a.token_ids) == ref and a.prompt_tokens == prompt_len
    assert len(ref) == N or ref[-1] in pipe.language_model.eos_ids


@pytest.mark.parametrize("prompt", ["What is in the picture?", "Is this safe?"])
def test_clean_image_gets_no_extra_tokens_and_equals_hf(setup, demo_sources, prompt):
    pipe, _, _, clean = setup
    a = pipe.generate(clean, prompt, max_new_tokens=N)
    assert not a.verdict.flagged and a.action == "generated"
    ref, prompt_len = hf_generate(demo_sources, pipe, clean, prompt)
    assert list(a.token_ids) == ref and a.prompt_tokens == prompt_len
    assert set(a.timings) >= {"vision_gate_ms", "prefill_ms", "decode_tokens_per_s", "ttft_ms"}


def test_annotate_generates_unchanged_but_reports(setup, demo_sources):
    pipe, _, toxic, _ = setup
    a = pipe.generate(toxic, "What is in the picture?", policy="annotate", max_new_tokens=N)
    ref, _ = hf_generate(demo_sources, pipe, toxic, "What is in the picture?")
    assert a.verdict.flagged and a.action == "annotated" and list(a.token_ids) == ref


def test_refuse_never_runs_the_language_model(setup, monkeypatch):
    pipe, _, toxic, clean = setup

    def forbidden(*a, **k):
        raise AssertionError("the decoder ran under policy refuse")

    monkeypatch.setattr(pipe.language_model.decoder, "prefill", forbidden)
    monkeypatch.setattr(pipe.language_model.decoder, "decode_one_token", forbidden)
    a = pipe.generate(toxic, "What is in the picture?", policy="refuse")
    assert a.action == "refused" and a.finish_reason == "refused" and a.token_ids == ()
    assert a.text == pipe.manifest.gate["refusals"]["gun"]
    with pytest.raises(AssertionError, match="decoder ran"):
        pipe.generate(clean, "What is in the picture?", policy="refuse")   # a clean image is answered


def test_text_only_prompt_is_not_gated_and_equals_hf(setup, demo_sources):
    pipe = setup[0]
    a = pipe.generate(None, "Tell me a story.", max_new_tokens=N)
    ref, _ = hf_generate(demo_sources, pipe, None, "Tell me a story.")
    assert a.verdict is None and list(a.token_ids) == ref


def test_stream_matches_generate_and_sampling_is_reproducible(setup):
    pipe, _, _, clean = setup
    s = pipe.stream(clean, "Hi", max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    pieces = list(s)
    assert "".join(pieces) == s.result.text
    again = pipe.generate(clean, "Hi", max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    assert again.token_ids == s.result.token_ids
    others = {pipe.generate(clean, "Hi", max_new_tokens=12, temperature=0.9, seed=k).token_ids for k in range(4)}
    assert len(others) > 1


def test_abandoned_or_interleaved_streams_block_nobody_and_stay_exact(setup):
    """The lock is held per decoder step, never across a yield; a stream whose cache another request
    overwrote rebuilds it and still gives the uninterrupted greedy tokens."""
    import threading

    pipe, _, toxic, clean = setup
    ref_a = pipe.generate(clean, "Describe the colours.", max_new_tokens=N).token_ids
    ref_b = pipe.generate(toxic, "What is in the picture?", policy="annotate", max_new_tokens=N).token_ids
    a = pipe.stream(clean, "Describe the colours.", max_new_tokens=N)
    it_a = iter(a)
    next(it_a), next(it_a)                                       # then left alone, not closed
    done = []
    t = threading.Thread(target=lambda: done.append(pipe.generate(clean, "Hi", max_new_tokens=4)), daemon=True)
    t.start()
    t.join(timeout=120)
    assert done, "a half-read stream blocked the next request"
    b = pipe.stream(toxic, "What is in the picture?", policy="annotate", max_new_tokens=N)
    pending = [it_a, iter(b)]
    while pending:                                               # one piece each in turn, to the end
        pending = [it for it in pending if next(it, None) is not None]
    assert a.result.token_ids == ref_a and b.result.token_ids == ref_b


def test_safeclip_threads_reaches_both_sessions(setup, monkeypatch):
    _, bundle, _, _ = setup
    monkeypatch.setenv("SAFECLIP_THREADS", "1")
    pipe = Pipeline.load(bundle)
    assert pipe.vision.session.sess.get_session_options().intra_op_num_threads == 1
    assert pipe.language_model.decoder.session.get_session_options().intra_op_num_threads == 1
    pipe = Pipeline.load(bundle, threads=2)                       # an explicit count wins
    assert pipe.language_model.decoder.session.get_session_options().intra_op_num_threads == 2


def test_safeclip_spin_sets_the_thread_pool_spinning(monkeypatch):
    from safeclip.runtime.backends.ort import make_options

    key = "session.intra_op.allow_spinning"
    monkeypatch.delenv("SAFECLIP_SPIN", raising=False)
    with pytest.raises(RuntimeError):                                    # unset: ONNX Runtime's default
        make_options(2).get_session_config_entry(key)
    monkeypatch.setenv("SAFECLIP_SPIN", "0")
    assert make_options(2).get_session_config_entry(key) == "0"
    assert make_options(2, spin=True).get_session_config_entry(key) == "1"   # an explicit choice wins
    monkeypatch.setenv("SAFECLIP_SPIN", "off")
    with pytest.raises(ValueError, match="SAFECLIP_SPIN must be 0 or 1"):
        make_options(2)


def test_prompt_too_long_fails_before_any_work(setup, monkeypatch):
    pipe, bundle, toxic, _ = setup
    small = Pipeline.load(bundle, context=600)                    # 576 image positions + a little text
    monkeypatch.setattr(small.vision, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("vision ran")))
    with pytest.raises(ContextError, match="exceeds the context capacity of 600"):
        small.stream(toxic, "word " * 100)


def test_safeclip_run_json_and_errors(setup, capsys, tmp_path):
    _, bundle, toxic, _ = setup
    assert run_cli.main(["--bundle", str(bundle), "--image", str(toxic), "--prompt", "What?", "--json",
                         "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"]["flagged"] and out["verdict"]["category"] == "gun" and out["policy"] == "instruct"
    assert {"text", "timings", "backend"} <= set(out)
    assert run_cli.main(["--bundle", str(bundle), "--image", str(toxic), "--prompt", "What?",
                         "--policy", "refuse"]) == 0
    assert "firearms" in capsys.readouterr().out
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert run_cli.main(["--bundle", str(bundle), "--image", str(tmp_path / "bad.jpg"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "safeclip-run: error" in err and "Traceback" not in err
    assert run_cli.main(["--bundle", str(bundle), "--prompt", "x", "--max-new-tokens", "0"]) == 2
