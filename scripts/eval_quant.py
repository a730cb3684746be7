"""Quality of a weight-quantised bundle against its float twin, on your own text and images.

    python scripts/eval_quant.py --reference engines/llava-fp16 --candidate engines/llava-int4 \\
        --text my_corpus.txt --images photos/ [--prompt "Describe the image."] [--json out.json]

Both bundles must come from the same checkpoint (the script checks that their tokenizers and model facts
match). They are loaded one after the other (a 7B bundle of each would not fit an 8 GB Orin together).

* **Perplexity** on ``--text``: the text is tokenized with the bundle's own tokenizer (a BOS first when the
  model has one) and cut into non-overlapping windows of ``--window`` tokens (default 512, at most the
  bundle's context). In each window every token after the first is scored by the decoder given the tokens
  before it; the decoder graph returns the last position's logits only, so this runs one decode step per
  token (a 2000-token file is 2000 steps per bundle). PPL = exp(mean negative log-likelihood), float64.
* **Greedy agreement** on ``--images`` (a folder or files): each image is answered by both bundles with the
  same prompt, greedy, ``--max-new-tokens`` (default 32), gate policy ``annotate`` (so a flagged image is still
  answered and scored). Reported: exact agreement of the token sequences, the mean length of the common
  prefix as a fraction of the reference answer, and gate-verdict agreement (the vision tower is not
  quantised, so verdicts should agree exactly).

Prints a table; ``--json`` writes every figure. What to expect is in README ("Weight-only int8/int4").
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _images(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    return out


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    z = np.asarray(logits, np.float64).reshape(-1)
    m = z.max()
    return float(z[token] - m - math.log(np.exp(z - m).sum()))


def perplexity(pipe, text: str, window: int) -> dict:
    """exp(mean NLL) of ``text`` under the bundle's decoder, windows of ``window`` tokens (see the docstring)."""
    lm = pipe.language_model                                       # decoder, embedding table, tokenizer (runtime/pipeline.py)
    bos = pipe.manifest.model.get("bos_token_id")
    ids = lm.tokenizer.encode(text, add_special_tokens=False).ids
    ids = ([int(bos)] if bos is not None else []) + list(ids)
    dtype = np.dtype(pipe.manifest.decoder.inputs[pipe.manifest.decoder.names.inputs_embeds].dtype)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        lm.decoder.reset()
        logits = lm.decoder.prefill(np.asarray(lm.table[chunk[:1]], dtype))          # [1, D]: the first token
        for nxt in chunk[1:]:
            nll -= _log_softmax_at(logits, nxt)
            count += 1
            logits = lm.decoder.decode_one_token(np.asarray(lm.table[nxt], dtype))
    lm.decoder.reset()
    if not count:
        raise SystemExit("eval_quant: --text has fewer than 2 tokens")
    return {"tokens_scored": count, "nll": nll / count, "ppl": math.exp(nll / count)}


def answers(pipe, images: list[Path], prompt: str, n: int) -> list[dict]:
    out = []
    for img in images:
        a = pipe.generate(img, prompt, policy="annotate", max_new_tokens=n)
        v = a.verdict
        out.append({"image": str(img), "token_ids": list(a.token_ids), "text": a.text,
                    "flagged": None if v is None else bool(v.flagged),
                    "category": None if v is None else v.category})
    return out


def evaluate(bundle: Path, text: str | None, images: list[Path], args) -> dict:
    from safeclip.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, backend=args.backend)
    if not pipe.has_language_model:
        raise SystemExit(f"eval_quant: {bundle} has no language model")
    res = {"bundle": str(bundle), "weights": (pipe.manifest.graphs["decoder"].get("quantization") or
                                              {"bits": None, "form": "float"}),
           "backend": pipe.backend, "model": pipe.manifest.model}
    window = min(args.window, int(pipe.manifest.default_context or pipe.manifest.model["context_length"]))
    if text is not None:
        res["perplexity"] = perplexity(pipe, text, window)
    res["answers"] = answers(pipe, images, args.prompt, args.max_new_tokens)
    del pipe
    gc.collect()
    return res


def compare(ref: dict, cand: dict) -> dict:
    keys = ("vocab_size", "eos_token_ids", "image_token_id", "hidden_size", "num_layers")
    if any(ref["model"].get(k) != cand["model"].get(k) for k in keys):
        raise SystemExit("eval_quant: the bundles are not of the same model (model facts differ)")
    pairs = list(zip(ref["answers"], cand["answers"]))
    exact = [a["token_ids"] == b["token_ids"] for a, b in pairs]
    prefix = []
    for a, b in pairs:
        k = 0
        while k < min(len(a["token_ids"]), len(b["token_ids"])) and a["token_ids"][k] == b["token_ids"][k]:
            k += 1
        prefix.append(k / max(len(a["token_ids"]), 1))
    out = {"images": len(pairs),
           "exact_agreement": float(np.mean(exact)) if pairs else None,
           "mean_common_prefix": float(np.mean(prefix)) if pairs else None,
           "verdict_agreement": float(np.mean([(a["flagged"], a["category"]) == (b["flagged"], b["category"])
                                               for a, b in pairs])) if pairs else None}
    if "perplexity" in ref and "perplexity" in cand:
        p0, p1 = ref["perplexity"]["ppl"], cand["perplexity"]["ppl"]
        out.update({"ppl_reference": p0, "ppl_candidate": p1, "ppl_delta": p1 - p0, "ppl_ratio": p1 / p0})
    return out


def table(r: dict) -> str:
    c = r["comparison"]
    rows = ["| | reference | candidate |", "|---|---|---|",
            f"| bundle | {r['reference']['bundle']} | {r['candidate']['bundle']} |",
            f"| weights | {_w(r['reference'])} | {_w(r['candidate'])} |"]
    if "ppl_reference" in c:
        rows.append(f"| perplexity ({r['reference']['perplexity']['tokens_scored']} tokens) | "
                    f"{c['ppl_reference']:.3f} | {c['ppl_candidate']:.3f} (Δ {c['ppl_delta']:+.3f}) |")
    if c["images"]:
        rows += [f"| greedy answers identical | | {c['exact_agreement']:.0%} of {c['images']} images |",
                 f"| mean common prefix | | {c['mean_common_prefix']:.0%} of the reference answer |",
                 f"| gate verdicts identical | | {c['verdict_agreement']:.0%} |"]
    return "\n".join(rows) + "\n"


def _w(side: dict) -> str:
    q = side["weights"]
    return "float" if not q.get("bits") else f"int{q['bits']} ({q['form']}, block {q.get('block_size')})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="the float (fp16/fp32) bundle")
    ap.add_argument("--candidate", type=Path, required=True, help="the int8/int4 bundle of the same checkpoint")
    ap.add_argument("--text", type=Path, default=None, help="a UTF-8 text file for perplexity")
    ap.add_argument("--images", type=Path, nargs="*", default=[], help="image files or folders")
    ap.add_argument("--prompt", default="Describe the image in one sentence.")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--window", type=int, default=512)
    from safeclip.runtime.backends.pick import BACKEND_CHOICES, BACKEND_HELP
    ap.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.text is None and not args.images:
        ap.error("give --text and/or --images")
    text = args.text.read_text(encoding="utf-8") if args.text else None
    images = _images(args.images)
    ref = evaluate(args.reference, text, images, args)
    cand = evaluate(args.candidate, text, images, args)
    res = {"reference": ref, "candidate": cand, "comparison": compare(ref, cand), "prompt": args.prompt}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
