"""Grammar-constrained decoding cost: the token mask per token, and constrained vs unconstrained decode tokens/s.

One run on one machine:

* Mask cost: a :class:`runtime.grammar.Constraint` driven through a fixed valid answer of a small schema
  (object with enum, number bounds, free string, array), the answer tokenized by the engine itself; per token
  the mask alone (``allowed``) and the mask applied to a logits row (``apply``: what the decode loop adds).
  Vocabularies: Llama-2 (32000, SentencePiece with byte fallback) and Llama-3 (128256, byte-level BPE) from
  ``scripts/fetch_test_vocab.py``'s converted ``tokenizer.json`` files (skipped when absent), else the
  bench's own byte-level 32000 vocabulary.
* Decode: the random-weight LLaVA at ``--shape`` (default TinyLlama-1.1B: hidden 2048, 22 layers, vocab 32000)
  exported int4 (block 128) as ``scripts/bench_quant.py`` does (in ``--work``; ``--clean`` deletes the
  multi-GB checkpoint and bundle after), the runtime's decoder for its KV form (``bench_quant.decoder_class``)
  with ``--threads`` intra-op threads. Its tokenizer is the Llama-2 one where present (same 32000 ids: the
  weights are random, the mask is real). Alternated in one process, ``--repeats`` rounds: one sequence greedy
  unconstrained, then constrained by a JSON schema whose string field leaves the random model room for
  ``--new-tokens`` tokens (eos disabled for the unconstrained run); then the batched scheduler with
  ``--batch`` sequences, unconstrained and constrained (wall time per decode step, prefills included, and the
  mean batch: constrained sequences may end early, which shrinks the batch). One-sequence decode time per token = (last token - first token) / (tokens - 1); medians over rounds;
  overhead = constrained / unconstrained - 1 (issue 25's target: at most 5% at TinyLlama-1.1B int4 CPU).

    python scripts/bench_grammar.py                # ~10 min on 2 shared cores the first time (export), ~3 after
    python scripts/bench_grammar.py --quick        # tiny shape

JSON to ``--out`` (default ``bench-results/bench_grammar.json``), a Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from safeclip.runtime.manifest import atomic_write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_generate import SHAPES, machine_facts, make_tokenizer  # noqa: E402
from bench_quant import decoder_class  # noqa: E402

MASK_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["object", "x", "name", "tags"],
               "properties": {"object": {"type": "string", "enum": ["cup", "ball", "box"]},
                              "x": {"type": "number", "minimum": 0, "maximum": 1},
                              "name": {"type": "string", "maxLength": 40},
                              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}
MASK_TEXT = '{"object":"cup","x":0.5,"name":"hello world friend","tags":["a","bb","some longer tag"]}'
DECODE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["object", "caption"],
                 "properties": {"object": {"type": "string", "enum": ["cup", "ball", "box"]},
                                "caption": {"type": "string"}}}


def real_vocab(name: str):
    """(tokens.Tokenizer, eos id) of a converted test vocabulary, or None when it is not on this machine."""
    try:
        import _vocab
        from tokenizers import Tokenizer
        path, specials = _vocab.converted_file(name)
    except BaseException:                     # absent (pytest.skip is a BaseException), or no transformers
        return None
    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id(specials.get("eos_token") or "</s>")
    return tok, eos


def mask_cost(tok, eos: int, label: str, repeats: int) -> dict:
    from safeclip.runtime.grammar import Compiler, Grammar

    t0 = time.perf_counter()
    comp = Compiler(tok, [eos])
    load_s = time.perf_counter() - t0
    g = Grammar.json_schema(MASK_SCHEMA)
    t0 = time.perf_counter()
    comp.compile(g)
    compile_s = time.perf_counter() - t0
    ids = comp.tok.tokenize_str(MASK_TEXT)
    logits = np.random.default_rng(0).standard_normal(comp.n_vocab).astype(np.float32)
    mask_us, apply_us = [], []
    for _ in range(repeats):
        c = comp.constraint(g)
        for t in ids:
            a = time.perf_counter()
            c.allowed()
            b = time.perf_counter()
            c.apply(logits)
            e = time.perf_counter()
            mask_us.append((b - a) * 1e6)
            apply_us.append((e - b) * 1e6)
            c.advance(t)
        assert c.done, "the answer did not complete the grammar"
    q = lambda xs, p: float(np.percentile(xs, p))                                   # noqa: E731
    return {"vocab": label, "vocab_size": comp.n_vocab, "tokens": len(ids), "tokenizer_load_s": load_s,
            "compile_ms": compile_s * 1e3,
            "mask_us": {"mean": float(np.mean(mask_us)), "median": q(mask_us, 50), "p90": q(mask_us, 90),
                        "max": float(np.max(mask_us))},
            "apply_us": {"mean": float(np.mean(apply_us)), "median": q(apply_us, 50), "p90": q(apply_us, 90),
                         "max": float(np.max(apply_us))}}


def ensure_bundle(work: Path, shape: str, rebuild: bool, block: int) -> Path:
    """The int4 bundle of bench_quant (checkpoint and export in subprocesses of bench_quant.py)."""
    ckpt, out = work / f"ckpt-{shape}", work / f"{shape}-int4-b{block}"
    quant = [sys.executable, str(HERE / "bench_quant.py")]
    if rebuild or not (ckpt / "stamp.json").exists():
        subprocess.run([*quant, "--_checkpoint", str(ckpt), "--shape", shape], check=True)
    if rebuild or not (out / "bundle.json").exists():
        subprocess.run([*quant, "--_export", str(out), "--ckpt", str(ckpt), "--weights", "int4", "--block-size",
                        str(block), "--shape", shape], check=True)
    return out


def per_token_s(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def decode(args, bundle: Path, tok, eos: int) -> dict:
    from safeclip.runtime.backends.ort import make_options
    from safeclip.runtime.backends.pick import slot_decoder
    from safeclip.runtime.generate import generate
    from safeclip.runtime.grammar import Compiler, Grammar
    from safeclip.runtime.scheduler import Scheduler

    info = json.loads((bundle / "bundle.json").read_text())
    ctx = int(info["model"]["context_length"])
    dec = decoder_class(info).from_manifest(bundle, info["graphs"]["decoder"], capacity=min(256, ctx),
                                            context_length=ctx, session_options=make_options(args.threads))
    table = np.load(bundle / info["embeddings"]["file"], mmap_mode="r")
    if tok is None:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    comp = Compiler(tok, [eos])
    g = Grammar.json_schema(DECODE_SCHEMA)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(300, table.shape[0], args.prompt_len) for _ in range(max(1, args.batch))]

    def one(constrained: bool) -> tuple[float, int, str]:
        stamps: list[float] = []
        res = generate(dec, table, np.asarray(table[prompts[0]], dec.dtype), tokenizer=tok,
                       max_new_tokens=args.new_tokens, eos_token_ids=[eos] if constrained else [],
                       constraint=comp.constraint(g) if constrained else None,
                       on_token=lambda t, p: stamps.append(time.perf_counter()))
        return per_token_s(stamps), len(res.token_ids), res.text

    def batched(constrained: bool) -> tuple[float, float, float]:
        sched = Scheduler(slot_decoder(dec, args.batch), table)
        try:
            t0 = time.perf_counter()
            streams = [sched.submit(np.asarray(table[p], dec.dtype), tokenizer=tok, max_new_tokens=args.new_tokens,
                                    eos_token_ids=[eos] if constrained else [],
                                    constraint=comp.constraint(g) if constrained else None) for p in prompts]
            n = 0
            for s in streams:
                "".join(s)
                n += len(s.result.token_ids)
            wall = time.perf_counter() - t0
            st = sched.stats()
        finally:
            sched.close()
        return wall / max(1, st["steps"]), n / wall, st["mean_batch"]

    one(False), one(True)                                         # warm-up
    rows = {"single_plain_s": [], "single_grammar_s": [], "batch_plain_step_s": [], "batch_grammar_step_s": [],
            "batch_plain_tps": [], "batch_grammar_tps": [], "batch_plain_mean_b": [], "batch_grammar_mean_b": [],
            "grammar_tokens": []}
    sample = ""
    for _ in range(args.repeats):
        s, _, _ = one(False)
        rows["single_plain_s"].append(s)
        s, n, sample = one(True)
        rows["single_grammar_s"].append(s)
        rows["grammar_tokens"].append(n)
        if args.batch > 1:
            for kind, constrained in (("plain", False), ("grammar", True)):
                step, tps, mean_b = batched(constrained)
                rows[f"batch_{kind}_step_s"].append(step)
                rows[f"batch_{kind}_tps"].append(tps)
                rows[f"batch_{kind}_mean_b"].append(mean_b)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    out = {"rounds": rows, "median": med, "sample_constrained_text": sample[:200],
           "single_overhead": med["single_grammar_s"] / med["single_plain_s"] - 1}
    if args.batch > 1:
        out["batch_step_overhead"] = med["batch_grammar_step_s"] / med["batch_plain_step_s"] - 1
    return out


def markdown(r: dict) -> str:
    lines = ["| vocabulary | tokens | mask mean / median / p90 (us) | mask+apply mean (us) | compile (ms) | "
             "tokenizer load (s) |", "|---|---:|---:|---:|---:|---:|"]
    for m in r["mask"]:
        lines.append(f"| {m['vocab']} ({m['vocab_size']}) | {m['tokens']} | {m['mask_us']['mean']:.0f} / "
                     f"{m['mask_us']['median']:.0f} / {m['mask_us']['p90']:.0f} | "
                     f"{m['mask_us']['mean'] + m['apply_us']['mean']:.0f} | {m['compile_ms']:.1f} | "
                     f"{m['tokenizer_load_s']:.2f} |")
    d = r.get("decode")
    if d:
        med = d["median"]
        lines += ["", f"Decode, {r['shape']} int4, {r['threads']} threads, medians of {r['repeats']} alternated rounds:",
                  "", "| | unconstrained | constrained | overhead |", "|---|---:|---:|---:|",
                  f"| one sequence, ms/token | {med['single_plain_s'] * 1e3:.1f} | {med['single_grammar_s'] * 1e3:.1f} "
                  f"| {d['single_overhead']:+.1%} |"]
        if "batch_step_overhead" in d:
            lines += [f"| batch of {r['batch']}, wall ms/step (mean B {med['batch_plain_mean_b']:.1f} / "
                      f"{med['batch_grammar_mean_b']:.1f}) | {med['batch_plain_step_s'] * 1e3:.1f} | "
                      f"{med['batch_grammar_step_s'] * 1e3:.1f} | {d['batch_step_overhead']:+.1%} |",
                      f"| batch of {r['batch']}, tokens/s | {med['batch_plain_tps']:.1f} | "
                      f"{med['batch_grammar_tps']:.1f} | |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="the tiny shape, fewer rounds")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SAFECLIP_BENCH_WORK", "/work/bench_ckpt"))
                    / "grammar")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mask-only", action="store_true", help="skip the decode runs (no export)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoint and bundle after the run")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_grammar.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.repeats, args.new_tokens = "quick", 2, 16
    res = {"machine": machine_facts(), "shape": args.shape, "threads": args.threads,
           "repeats": args.repeats, "batch": args.batch, "mask": []}
    vocabs = [(n, real_vocab(n)) for n in ("llama2", "llama3")]
    for name, v in vocabs:
        if v is not None:
            res["mask"].append(mask_cost(v[0], v[1], name, repeats=20))
    if not res["mask"]:
        res["mask"].append(mask_cost(make_tokenizer(32000), 2, "bench byte-level", repeats=20))
    if not args.mask_only:
        bundle = ensure_bundle(args.work, args.shape, args.rebuild, 64 if args.quick else 128)
        llama2 = vocabs[0][1]
        same = llama2 is not None and SHAPES[args.shape]["vocab_size"] == 32000
        try:
            res["decode"] = decode(args, bundle, llama2[0] if same else None, llama2[1] if same else 2)
            res["decode"]["tokenizer"] = "llama2" if same else "bench byte-level"
        finally:
            if args.clean:
                shutil.rmtree(args.work, ignore_errors=True)
    atomic_write_text(args.out, json.dumps(res, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
