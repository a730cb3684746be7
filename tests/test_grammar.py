"""Grammar-constrained decoding (runtime/grammar.py, generate.picker/Progress, the scheduler) on the demo model.

Oracle: transformers ``generate()`` on the same random-weight model with a logits processor made of the same
engine's torch helpers (``llguidance.hf.from_tokenizer`` + ``llguidance.torch.fill_next_token_bitmask``): the
runtime's constrained greedy tokens must equal it token for token (the runtime ends at the grammar's end, where
transformers decodes the forced EOS), alone and in the batched scheduler; outputs must parse and validate.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from _lm_models import exported  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from safeclip.runtime import generate as G  # noqa: E402
from safeclip.runtime.backends.ort import OrtDecoder  # noqa: E402
from safeclip.runtime.backends.slots import SlotDecoder  # noqa: E402
from safeclip.runtime.grammar import Compiler, Grammar, GrammarError  # noqa: E402
from safeclip.runtime.prompt import render, tokenize  # noqa: E402
from safeclip.runtime.scheduler import Scheduler  # noqa: E402

N_NEW = 60
SCHEMAS = {
    "object_enum_bounds": {"type": "object", "additionalProperties": False, "required": ["object", "n", "ok"],
                           "properties": {"object": {"type": "string", "enum": ["cup", "ball", "box"]},
                                          "n": {"type": "integer", "minimum": 1, "maximum": 7},
                                          "ok": {"type": "boolean"}}},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 3},
    "any_of": {"type": "object", "additionalProperties": False, "required": ["r"],
               "properties": {"r": {"anyOf": [{"const": "left"}, {"type": "integer", "minimum": -3, "maximum": 3},
                                              {"type": "null"}]}}},
}



def hf_mask(ltok, grammar_text: str, prompt_len: int):
    """The oracle's side: transformers' logits processor applying llguidance's own mask for ``grammar_text``
    (rows past the tokenizer's vocabulary, such as a model's padding rows, never allowed)."""
    import llguidance.torch as lt
    from transformers import LogitsProcessor

    matcher = llguidance.LLMatcher(ltok, grammar_text, log_level=0)
    bits = lt.allocate_token_bitmask(1, ltok.vocab_size)

    class Mask(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > prompt_len:
                assert matcher.consume_token(int(input_ids[0, -1]))
            lt.fill_next_token_bitmask(matcher, bits)
            allowed = ((bits[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1).bool()
            out = torch.full_like(scores, float("-inf"))
            n = min(scores.shape[1], allowed.numel(), ltok.vocab_size)
            out[:, :n] = torch.where(allowed[:n], scores[:, :n], out[:, :n])
            return out

    return Mask()

class Demo:
    def __init__(self):
        self.lm = lm = exported(2, "float32")
        facts = lm.frag["model"]
        self.decoder = OrtDecoder.from_manifest(lm.bundle, lm.frag["graphs"]["decoder"],
                                                context_length=facts["context_length"])
        self.table = np.load(lm.bundle / lm.frag["embeddings"]["file"], mmap_mode="r")
        self.tok = Tokenizer.from_file(str(lm.llava_dir / "tokenizer.json"))
        self.eos = [int(lm.hf_tokenizer.eos_token_id)]
        self.comp = Compiler(self.tok, self.eos)
        template = (lm.llava_dir / "chat_template.jinja").read_text()
        self.ids = lambda text: tokenize(self.tok, render(template, text, False, None), facts["image_token_id"],
                                         facts["image_seq_length"], num_images=0)

    def run(self, text, grammar, **kw):
        kw = {"max_new_tokens": N_NEW, "eos_token_ids": self.eos, "tokenizer": self.tok, **kw}
        return G.generate(self.decoder, self.table, self.table[self.ids(text)],
                          constraint=self.comp.constraint(grammar), **kw)

    def reference(self, text, grammar_text):
        """transformers greedy generate() with llguidance's mask as a logits processor."""
        import llguidance.hf
        from transformers import LogitsProcessorList

        ltok = llguidance.hf.from_tokenizer(self.lm.hf_tokenizer, eos_token=self.eos)
        ids = self.ids(text)
        with torch.no_grad():
            ref = self.lm.model.generate(input_ids=torch.tensor(ids)[None], max_new_tokens=N_NEW + 1,
                                         do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         eos_token_id=self.eos, pad_token_id=self.eos[0],
                                         logits_processor=LogitsProcessorList([hf_mask(ltok, grammar_text, len(ids))]))
        return ref[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def demo():
    return Demo()


def _schema_grammar_text(schema):
    from safeclip.runtime.grammar import KINDS
    g = Grammar.json_schema(schema)
    return g, KINDS[g.kind](g.source)


# --- compiling ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema,keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "format": "bogus"}, "format"),
    ({"if": {"type": "string"}, "then": {}}, "if"),
])
def test_an_uncompilable_schema_names_the_keyword(demo, schema, keyword):
    with pytest.raises(GrammarError) as e:
        demo.comp.compile(Grammar.json_schema(schema))
    assert e.value.keyword == keyword and keyword in str(e.value) and "\n" not in str(e.value)


def test_bad_grammars_are_one_line_errors(demo):
    for g in (Grammar.regex("a(b"), Grammar.lark("start: foo"), Grammar("yaml", "x")):
        with pytest.raises(GrammarError) as e:
            demo.comp.compile(g)
        assert "\n" not in str(e.value)
    with pytest.raises(GrammarError, match="must be an object"):
        Grammar.json_schema([1])


def test_compiled_grammars_are_cached_and_constraints_independent(demo):
    g = Grammar.json_schema(SCHEMAS["array"])
    assert demo.comp.compile(g) is demo.comp.compile(Grammar.json_schema(json.loads(json.dumps(SCHEMAS["array"]))))
    a, b = demo.comp.constraint(g), demo.comp.constraint(g)
    a.advance(demo.tok.token_to_id("["))
    assert not b.allowed()[demo.tok.token_to_id("1")] and a.allowed()[demo.tok.token_to_id("1")]


def test_json_is_compact_and_eos_only_where_complete(demo):
    c = demo.comp.constraint(Grammar.json_object())
    ok = c.allowed()
    assert ok[demo.tok.token_to_id("{")] and ok.sum() == 1                     # only "{" may start
    c.advance(demo.tok.token_to_id("{"))
    space = demo.tok.encode(" ", add_special_tokens=False).ids[0]
    assert not c.allowed()[space] and not c.allowed()[demo.eos[0]]
    c.advance(demo.tok.token_to_id("}"))
    assert c.done and c.accepting


def test_a_rejected_token_raises(demo):
    c = demo.comp.constraint(Grammar.regex("[0-9]{2}"))
    with pytest.raises(GrammarError, match="does not follow"):
        c.advance(demo.tok.token_to_id("a"))


# --- decoding == transformers with the engine's processor ------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_constrained_greedy_equals_transformers(demo, name):
    g, text = _schema_grammar_text(SCHEMAS[name])
    prompt = f"Answer as JSON ({name})."
    res = demo.run(prompt, g)
    ref = demo.reference(prompt, text)
    assert ref[-1] == demo.eos[0] and res.token_ids == ref[:-1]                # the forced EOS is not decoded
    assert res.finish_reason == "eos"
    jsonschema.validate(json.loads(res.text), SCHEMAS[name])


def test_unconstrained_output_is_not_json(demo):
    """The same prompt without the grammar: the random model does not write the schema on its own."""
    res = G.generate(demo.decoder, demo.table, demo.table[demo.ids("Answer as JSON (array).")],
                     tokenizer=demo.tok, max_new_tokens=20, eos_token_ids=demo.eos)
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(res.text), SCHEMAS["array"])


def test_sampled_decoding_follows_the_schema(demo):
    texts = set()
    for seed in range(4):
        res = demo.run("Pick one.", Grammar.json_schema(SCHEMAS["object_enum_bounds"]), temperature=1.0,
                       seed=seed)
        jsonschema.validate(json.loads(res.text), SCHEMAS["object_enum_bounds"])
        texts.add(res.text)
    assert len(texts) > 1                                                      # sampling, not greedy


def test_regex_and_lark_grammars(demo):
    import re
    res = demo.run("Code?", Grammar.regex(r"[A-Z]{2}-[0-9]{3}"))
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", res.text) and res.finish_reason == "eos"
    res = demo.run("Turn?", Grammar.lark('start: "turn " DIR\nDIR: "left" | "right"'))
    assert res.text in ("turn left", "turn right")


def test_stop_strings_still_apply(demo):
    res = demo.run("Code?", Grammar.regex(r"[A-Z]{2}-[0-9]{3}"), stop_strings=["-"])
    assert res.finish_reason == "stop" and "-" not in res.text and len(res.text) == 2


def test_batched_scheduler_equals_each_alone_and_transformers(demo):
    names = list(SCHEMAS)
    prompts = [f"Batch {i}: JSON please." for i in range(len(names))]
    alone = [demo.run(p, Grammar.json_schema(SCHEMAS[n])) for p, n in zip(prompts, names)]
    sched = Scheduler(SlotDecoder.sharing(demo.decoder, 3), demo.table)
    try:
        streams = [sched.submit(demo.table[demo.ids(p)], tokenizer=demo.tok, max_new_tokens=N_NEW,
                                eos_token_ids=demo.eos, constraint=demo.comp.constraint(Grammar.json_schema(SCHEMAS[n])))
                   for p, n in zip(prompts, names)]
        out = [("".join(s), s.result) for s in streams]
    finally:
        sched.close()
    assert sched.stats()["mean_batch"] > 1
    for (text, r), a, p, n in zip(out, alone, prompts, names):
        assert r.token_ids == a.token_ids and text == a.text and r.finish_reason == "eos"
        jsonschema.validate(json.loads(text), SCHEMAS[n])
    ref = demo.reference(prompts[0], _schema_grammar_text(SCHEMAS[names[0]])[1])
    assert out[0][1].token_ids == ref[:-1]


def test_a_grammar_error_ends_only_its_sequence(demo):
    class Broken:
        done = accepting = False

        def apply(self, logits):
            raise GrammarError("broken grammar")

    sched = Scheduler(SlotDecoder.sharing(demo.decoder, 2), demo.table)
    try:
        bad = sched.submit(demo.table[demo.ids("x")], tokenizer=demo.tok, max_new_tokens=5, constraint=Broken())
        good = sched.submit(demo.table[demo.ids("y")], tokenizer=demo.tok, max_new_tokens=5)
        with pytest.raises(Exception, match="broken grammar"):
            list(bad)
        list(good)                                                # the other sequence runs to its end
        assert good.result.finish_reason in ("length", "eos")
    finally:
        sched.close()


# --- a real vocabulary ----------------------------------------------------------------------------------
def test_llama2_vocabulary_masks(tmp_path):
    import _vocab
    tok = _vocab.backend_tokenizer("llama2")
    comp = Compiler(tok, [2])
    assert comp.n_vocab == 32000
    c = comp.constraint(Grammar.json_schema(SCHEMAS["object_enum_bounds"]))
    ok = c.allowed()
    starts = {tok.id_to_token(int(i)) for i in np.flatnonzero(ok)}
    assert starts and all(s.lstrip("\u2581").startswith("{") or s == "<0x7B>" for s in starts), sorted(starts)[:5]
    logits = c.apply(np.zeros(32064, np.float32))                          # a model with padding rows
    assert np.isneginf(logits[32000:]).all() and np.isfinite(logits[np.flatnonzero(ok)]).all()


def test_properties_come_in_schema_order(demo):
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha"],
              "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}}}
    res = demo.run("Two flags.", Grammar.json_schema(schema))
    assert list(json.loads(res.text)) == ["zeta", "alpha"]


# --- the oracle on a real vocabulary: Llama-2 SentencePiece (byte fallback, "▁" words), padded model vocab --
@pytest.fixture(scope="module")
def llama2_bundle(tmp_path_factory):
    import _tiny_llava as TL
    from test_real_vocab import E2E

    from safeclip.export.bundle import ExportOptions, export_bundle
    from safeclip.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("grammar-llama2")
    facts = TL.build(E2E["llama2"], root / "ckpt")
    clip = TL.build_clip(root / "clip")
    out = export_bundle(ExportOptions(model=str(root / "ckpt"), clip=str(clip), out=root / "bundle")).bundle
    return Pipeline.load(out), root / "ckpt", facts


@pytest.mark.parametrize("name", ["object_enum_bounds", "any_of"])
def test_constrained_greedy_equals_transformers_on_llama2_vocabulary(llama2_bundle, name):
    import llguidance.hf
    from test_real_vocab import runtime_ids
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LogitsProcessorList

    pipe, folder, facts = llama2_bundle
    lm = pipe.language_model
    assert facts["vocab_size"] > facts["tokens"]                          # logits rows past the tokenizer
    ids = runtime_ids(lm.tokenizer, lm.template, lm.special_tokens, lm.image_token_id, pipe.image_tokens(None),
                      f"Answer in JSON ({name}) ü 東京", False)
    g, text = _schema_grammar_text(SCHEMAS[name])
    comp = Compiler.for_tokenizer(lm.tokenizer, lm.eos_ids)
    res = G.generate(lm.decoder, lm.table, lm.table[ids], tokenizer=lm.tokenizer, max_new_tokens=N_NEW,
                     eos_token_ids=lm.eos_ids, constraint=comp.constraint(g))

    hf_tok = AutoTokenizer.from_pretrained(folder)
    ltok = llguidance.hf.from_tokenizer(hf_tok, eos_token=list(lm.eos_ids))

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=N_NEW + 1, do_sample=False,
                             logits_processor=LogitsProcessorList([hf_mask(ltok, text, len(ids))]))
    ref = out[0, len(ids):].tolist()
    assert ref[-1] in lm.eos_ids and res.token_ids == ref[:-1] and res.finish_reason == "eos"
    assert res.text == hf_tok.decode(ref, skip_special_tokens=True)
    assert any(hf_tok.convert_ids_to_tokens(t).startswith("\u2581") or len(hf_tok.decode([t])) > 1
               for t in res.token_ids)                                    # multi-character tokens were used
    jsonschema.validate(json.loads(res.text), SCHEMAS[name])


# --- the command line ----------------------------------------------------------------------------------------
def test_safeclip_run_json_schema(demo_bundle, tmp_path, capsys):
    from safeclip.runtime.run import main

    f = tmp_path / "answer.schema.json"
    f.write_text(json.dumps(SCHEMAS["object_enum_bounds"]))
    assert main(["--bundle", str(demo_bundle), "--prompt", "Pick one.", "--json-schema", str(f), "--json",
                 "--max-new-tokens", str(N_NEW)]) == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(out["text"]), SCHEMAS["object_enum_bounds"])
    f.write_text('{"type": "array", "uniqueItems": true}')
    assert main(["--bundle", str(demo_bundle), "--prompt", "x", "--json-schema", str(f)]) != 0
    err = capsys.readouterr().err.strip()
    assert "uniqueItems" in err and "\n" not in err and "Traceback" not in err
    f.write_text("{not json")
    assert main(["--bundle", str(demo_bundle), "--prompt", "x", "--json-schema", str(f)]) != 0
    assert "--json-schema" in capsys.readouterr().err
