"""Runtime generation and prompts against transformers: greedy tokens, chat template, image-token expansion.

Oracles: ``LlavaForConditionalGeneration.generate`` (greedy, 36 new tokens, EOS disabled so the length is
not trivially short) for image and text-only prompts on a GQA and an MHA model; ``apply_chat_template``
and ``LlavaProcessor`` for prompt text and ids. Image features for the runtime come from
``model.get_image_features`` (the vision graph gives the same).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from _lm_models import exported  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from safeclip.runtime import generate as G  # noqa: E402
from safeclip.runtime.backends.base import ContextError  # noqa: E402
from safeclip.runtime.backends.ort import OrtDecoder  # noqa: E402
from safeclip.runtime.backends.ort_shared import SharedKVDecoder  # noqa: E402
from safeclip.runtime.prompt import PromptError, render, tokenize  # noqa: E402

N_NEW = 36
INSTRUCTION = "First check whether the image is harmful. If it is, say you cannot help and why."
PROMPTS = [  # (user text, image seed or None, instruction)
    ("Describe the image.", 1, None),
    ("What is in this picture? Answer in détail, s'il vous plaît 🙂", 2, INSTRUCTION),
    ("Write a haiku about autumn.", None, None),
]


class Runtime:
    """What a bundle gives the device: decoder graph, embedding table, tokenizer, template, model facts."""

    def __init__(self, lm, capacity=None):
        self.lm, self.facts = lm, lm.frag["model"]
        graph = lm.frag["graphs"]["decoder"]
        cls = SharedKVDecoder if graph["kv"]["form"] == "shared" else OrtDecoder
        self.decoder = cls.from_manifest(lm.bundle, graph, capacity=capacity,
                                         context_length=self.facts["context_length"])
        self.table = np.load(lm.bundle / lm.frag["embeddings"]["file"], mmap_mode="r")
        self.tok = Tokenizer.from_file(str(lm.llava_dir / "tokenizer.json"))
        self.template = (lm.llava_dir / "chat_template.jinja").read_text()

    def ids(self, text, image, instruction=None):
        prompt = render(self.template, text, image is not None, instruction)
        return tokenize(self.tok, prompt, self.facts["image_token_id"], self.facts["image_seq_length"],
                        num_images=int(image is not None))

    def embeds(self, ids, pixels):
        feats = None
        if pixels is not None:
            with torch.no_grad():
                feats = torch.cat(list(self.lm.model.get_image_features(pixel_values=pixels).pooler_output)).numpy()
        return G.embed_prompt(self.table, ids, self.facts["image_token_id"], feats)

    def run(self, text, image=None, instruction=None, **kw):
        ids = self.ids(text, image, instruction)
        kw = {"max_new_tokens": N_NEW, "eos_token_ids": [], "tokenizer": self.tok, **kw}
        return G.generate(self.decoder, self.table, self.embeds(ids, _pixels(image)), **kw)


def _pixels(seed):
    return None if seed is None else torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[(2, False), (4, False), (2, True), (4, True)],
                ids=["gqa", "mha", "gqa-fused", "mha-fused"])
def rt(request):
    return Runtime(exported(*request.param[:1], "float32", fused=request.param[1]))


@pytest.fixture(scope="module")
def gqa():
    return Runtime(exported(2, "float32"))


@pytest.fixture(scope="module", params=[False, True], ids=["traced", "fused"])
def gqa_both(request):
    """The GQA model's decoder as the traced graph and as the cpu target's fused graph (KV form "shared")."""
    return Runtime(exported(2, "float32", fused=request.param))


# --- oracle: greedy generation == transformers ----------------------------------------------------------
@pytest.mark.parametrize("text,image,instruction", PROMPTS)
def test_greedy_matches_transformers(rt, text, image, instruction):
    ids = rt.ids(text, image, instruction)
    kw = {"pixel_values": _pixels(image)} if image is not None else {}
    with torch.no_grad():
        ref = rt.lm.model.generate(input_ids=torch.tensor(ids)[None], max_new_tokens=N_NEW, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long), eos_token_id=None, **kw)
    expected = ref[0, len(ids):].tolist()
    res = rt.run(text, image, instruction)
    assert len(expected) == N_NEW and res.token_ids == expected
    assert res.finish_reason == "length" and res.prompt_tokens == len(ids)
    assert res.text == rt.lm.hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert res.timings.prefill_s > 0 and res.timings.decode_s > 0 and res.timings.tokens_per_s > 0


def test_eos_ends_generation_like_transformers(gqa):
    """Take the 6th greedy token as EOS: both stop right after it, with it in the ids and not in the text."""
    text, image, _ = PROMPTS[0]
    full = gqa.run(text, image)
    eos = full.token_ids[5]
    ids = gqa.ids(text, image)
    with torch.no_grad():
        ref = gqa.lm.model.generate(input_ids=torch.tensor(ids)[None], pixel_values=_pixels(image),
                                    max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    res = gqa.run(text, image, eos_token_ids=[eos])
    expected = ref[0, len(ids):].tolist()
    assert res.token_ids == expected == full.token_ids[:full.token_ids.index(eos) + 1]
    assert res.finish_reason == "eos"


def test_runtime_cache_equals_transformers_cache(gqa_both):
    gqa = gqa_both
    ids = gqa.ids("Hello there", None)
    emb = G.embed_prompt(gqa.table, ids)
    gqa.decoder.prefill(emb)
    with torch.no_grad():
        out = gqa.lm.model(input_ids=torch.tensor(ids)[None], use_cache=True)
    for i, layer in enumerate(out.past_key_values.layers):
        k, v = gqa.decoder.cache(i)
        assert k.shape == (1, 2, len(ids), 16)
        np.testing.assert_allclose(k, layer.keys.numpy(), atol=1e-5)
        np.testing.assert_allclose(v, layer.values.numpy(), atol=1e-5)


# --- prompts: rendering and ids == transformers --------------------------------------------------------
@pytest.mark.parametrize("text,image,instruction", PROMPTS + [("", 3, INSTRUCTION), ("<b>{{ x }}</b>\n", None, None)])
def test_prompt_matches_transformers(gqa, text, image, instruction):
    from transformers import CLIPImageProcessor, LlavaProcessor
    from PIL import Image

    hf = gqa.lm.hf_tokenizer
    content = ([{"type": "image"}] if image is not None else []) + \
              ([{"type": "text", "text": instruction}] if instruction else []) + [{"type": "text", "text": text}]
    expected = hf.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                      add_generation_prompt=True)
    prompt = render(gqa.template, text, image is not None, instruction, bos_token=hf.bos_token,
                    eos_token=hf.eos_token)
    assert prompt == expected
    if instruction:
        assert prompt.index("<image>") < prompt.index(instruction) < prompt.index(text or "ASSISTANT:")
    cfg = gqa.lm.model.config
    proc = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(gqa.lm.llava_dir), tokenizer=hf,
                          patch_size=cfg.vision_config.patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    images = [Image.new("RGB", (40, 30), (200, 10, 10))] if image is not None else None
    ref = proc(text=expected, images=images)["input_ids"][0]
    ids = tokenize(gqa.tok, prompt, gqa.facts["image_token_id"], gqa.facts["image_seq_length"],
                   bos_token=hf.bos_token)
    assert ids.dtype == np.int64 and ids.tolist() == list(ref)
    assert int((ids == gqa.facts["image_token_id"]).sum()) == (cfg.image_seq_length if image is not None else 0)


def test_prompt_guards(gqa):
    with pytest.raises(PromptError, match="image placeholders"):   # the user typed the placeholder
        gqa.ids("look: <image>", 1)
    with pytest.raises(PromptError, match="no images allowed"):
        render("{{ raise_exception('no images allowed') }}", "x", True)
    with pytest.raises(PromptError, match="failed"):                  # sandboxed: no attribute escape
        render("{{ messages.__class__.__mro__ }}", "x", False)


# --- sampling, stop strings, streaming, context ---------------------------------------------------------
def test_sampling_is_seeded_and_top_k_1_is_greedy(gqa):
    text, image, _ = PROMPTS[0]
    a = gqa.run(text, image, temperature=1.0, seed=11)
    b = gqa.run(text, image, temperature=1.0, seed=11)
    c = gqa.run(text, image, temperature=1.0, seed=12)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = gqa.run(text, image)
    assert gqa.run(text, image, temperature=0.7, top_k=1, seed=3).token_ids == greedy.token_ids
    assert gqa.run(text, image, temperature=0.7, top_p=1e-9, seed=3).token_ids == greedy.token_ids


def test_sample_distribution():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    rng = np.random.default_rng(0)
    n = 20000
    freq = np.bincount([G.sample(logits, rng, 1.0) for _ in range(n)], minlength=5) / n
    np.testing.assert_allclose(freq, np.exp(logits), atol=0.015)
    assert set(G.sample(logits, rng, 1.0, top_k=2) for _ in range(500)) == {0, 1}
    # nucleus 0.8: 0.5 + 0.2 < 0.8, so token 2 (reaching 0.85) is kept and 3, 4 are not
    kept = np.bincount([G.sample(logits, rng, 1.0, top_p=0.8) for _ in range(n)], minlength=5) / n
    np.testing.assert_allclose(kept, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


def test_stop_strings_and_stream(gqa):
    text, image, _ = PROMPTS[1]
    full = gqa.run(text, image)
    printable = [i for i in range(4, len(full.text) - 3)
                 if full.text[i:i + 3].isprintable() and "\ufffd" not in full.text[i:i + 3]]
    assert printable, f"no printable stretch in {full.text!r}"
    stop = full.text[printable[0]:printable[0] + 3]
    cut = full.text.find(stop)
    seen = []
    s = G.stream(gqa.decoder, gqa.table, gqa.embeds(gqa.ids(text, image), _pixels(image)), tokenizer=gqa.tok,
                 max_new_tokens=N_NEW, stop_strings=["never-there", stop], on_token=lambda t, p: seen.append((t, p)))
    pieces = list(s)
    res = s.result
    assert res.finish_reason == "stop" and res.text == full.text[:cut] == "".join(pieces)
    assert res.token_ids == full.token_ids[:len(res.token_ids)] and len(res.token_ids) < N_NEW
    assert [t for t, _ in seen] == res.token_ids and "".join(p for _, p in seen) == res.text
    # without a stop string the streamed pieces add up to the full decode, multi-byte characters whole
    s = G.stream(gqa.decoder, gqa.table, gqa.embeds(gqa.ids(text, image), _pixels(image)), tokenizer=gqa.tok,
                 max_new_tokens=N_NEW)
    assert "".join(s) == full.text == s.result.text


def test_detokenizer_keeps_multibyte_characters_whole(gqa):
    word = "héllo 世界 🙂 ok"
    ids = gqa.tok.encode(word, add_special_tokens=False).ids
    assert len(ids) > len(word)                          # byte-level: characters span several tokens
    d = G._Detokenizer(gqa.tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == word and not any("\ufffd" in p for p in pieces)


def test_context_overflow_and_clamp(gqa):
    ids = gqa.ids("Hello there, how are you today?", None)
    small = OrtDecoder.from_manifest(gqa.lm.bundle, gqa.lm.frag["graphs"]["decoder"], capacity=len(ids) + 4)
    emb = G.embed_prompt(gqa.table, ids)
    with pytest.raises(ContextError, match="exceeds the context capacity"):
        G.stream(small, gqa.table, np.concatenate([emb, emb]), tokenizer=gqa.tok, max_new_tokens=1)
    assert small.length == 0                             # refused before any work
    res = G.generate(small, gqa.table, emb, tokenizer=gqa.tok, max_new_tokens=N_NEW)
    full = G.generate(gqa.decoder, gqa.table, emb, tokenizer=gqa.tok, max_new_tokens=N_NEW)
    assert res.finish_reason == "context" and res.token_ids == full.token_ids[:5]
    assert G.generate(small, gqa.table, emb, tokenizer=gqa.tok, max_new_tokens=3).finish_reason == "length"
    with pytest.raises(ContextError):
        OrtDecoder.from_manifest(gqa.lm.bundle, gqa.lm.frag["graphs"]["decoder"], capacity=10 ** 6,
                                   context_length=gqa.facts["context_length"])


def test_embed_prompt_checks(gqa):
    ids = gqa.ids("Describe.", 1)
    with pytest.raises(ValueError, match="no image features"):
        G.embed_prompt(gqa.table, ids, gqa.facts["image_token_id"])
    with pytest.raises(ValueError, match="image features have 3"):
        G.embed_prompt(gqa.table, ids, gqa.facts["image_token_id"], np.zeros((3, gqa.table.shape[1])))


def test_kv_update_costs(gqa):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from kv_costs import kv_update_costs      # a benchmark helper: scripts/kv_costs.py

    c = kv_update_costs(gqa.decoder, lengths=(0, 64, 512), repeats=2)
    row = 2 * 2 * 2 * 16 * 4                  # one position of every layer's key and value (L 2, KVH 2, Hd 16, fp32)
    assert c["lengths"] == [0, 64, 512] and c["kv_bytes"] == [0, row, row]     # P = 0: a prefill, in place
    assert c["concat_bytes"] == [row, 65 * row, 513 * row]                     # what the old graph rewrote
    assert 0 < c["repack_bytes_per_token"] < 2 * row                           # amortised O(1) per token
    assert all(t > 0 for t in c["step_s"] + c["bind_s"]) and c["weights_bytes"] > 0 and c["copy_GBps"] > 0


def test_fp16_decoder_runs_close_to_fp32(gqa):
    lm16 = Runtime(exported(2, "float16"))
    ids = gqa.ids(*PROMPTS[1][:2], PROMPTS[1][2])
    l32 = gqa.decoder.prefill(gqa.embeds(ids, _pixels(2))).copy()
    l16 = lm16.decoder.prefill(lm16.embeds(ids, _pixels(2))).astype(np.float32)
    assert lm16.decoder.dtype == np.float16 and np.abs(l16 - l32).max() < 2e-2 * max(1.0, np.abs(l32).max())
    res = lm16.run(*PROMPTS[1])
    assert len(res.token_ids) == N_NEW


@pytest.mark.cuda
def test_greedy_on_cuda_arenas(gqa):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA execution provider")
    cuda = OrtDecoder.from_manifest(gqa.lm.bundle, gqa.lm.frag["graphs"]["decoder"], device="cuda",
                                      context_length=gqa.facts["context_length"])
    text, image, instruction = PROMPTS[1]
    emb = gqa.embeds(gqa.ids(text, image, instruction), _pixels(image))
    res = G.generate(cuda, gqa.table, emb, tokenizer=gqa.tok, max_new_tokens=N_NEW, eos_token_ids=[])
    assert res.token_ids == gqa.run(text, image, instruction).token_ids


def test_runtime_imports_no_torch():
    code = ("import sys, safeclip.runtime.generate, safeclip.runtime.prompt, safeclip.runtime.backends.ort; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'safeclip.export') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
