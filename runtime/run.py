"""``safeclip-run``: one gated answer from a bundle (no torch needed).

    safeclip-run --bundle engines/demo --image photo.jpg --prompt "What is in the picture?"
    safeclip-run --bundle engines/demo --image photo.jpg --prompt "..." --policy refuse --json
    safeclip-run --bundle engines/demo --prompt "Hello" --stream          # text only: not gated
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backends.pick import BACKEND_CHOICES, BACKEND_HELP
from .gate import POLICIES
from .error_text import EXIT_INTERRUPTED, EXIT_USAGE, fail
from .signing import TRUSTED_KEY_HELP

PROG = "safeclip-run"


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeclip-run", description="Answer a question about an image with a "
                                "bundle's gated vision-language model.")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (engines/<name>)")
    p.add_argument("--image", type=Path, help="image file (omit for a text-only prompt, which is not gated)")
    p.add_argument("--prompt", required=True, help="the user's question")
    g = p.add_argument_group("gate")
    g.add_argument("--policy", choices=POLICIES, help="what a flagged image does "
                   "(default: the bundle's)")
    g.add_argument("--instruction", help="safety instruction text for the instruct policy ({category} is filled "
                   "in); refused with another policy, which would not use it")
    s = p.add_argument_group("generation")
    s.add_argument("--max-new-tokens", type=int, default=128, help="most tokens in the answer (default %(default)d)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=None, help="sampling: keep the K likeliest tokens (default: all; "
                   "needs --temperature > 0)")
    s.add_argument("--top-p", type=float, default=None, help="sampling: keep the likeliest tokens up to this "
                   "probability mass, in (0, 1] (default 1; needs --temperature > 0)")
    s.add_argument("--seed", type=int, default=None, help="sampling: seed for a reproducible answer (default: "
                   "random; needs --temperature > 0)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--context", type=int, default=None, help="KV-cache capacity (default: the export target's, "
                   "at most the model's context; more than the model's is refused)")
    o = p.add_argument_group("output")
    o.add_argument("--stream", action="store_true", help="print the answer as it is generated (not with --json)")
    o.add_argument("--json", action="store_true", help="print one JSON object at the end: text, verdict, policy, "
                   "timings (not with --stream)")
    o.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    o.add_argument("--full-verify", action="store_true", help="hash every bundle file (no verification cache)")
    o.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PEM", help=TRUSTED_KEY_HELP)
    return p


def _check_args(a) -> str | None:
    if a.max_new_tokens < 1:
        return "--max-new-tokens must be at least 1"
    if a.temperature < 0:
        return "--temperature must be >= 0"
    if a.top_k is not None and a.top_k < 1:
        return "--top-k must be at least 1"
    if a.top_p is not None and not 0 < a.top_p <= 1:
        return "--top-p must be in (0, 1]"
    if a.context is not None and a.context < 1:
        return "--context must be at least 1"
    if a.stream and a.json:          # --json is one object at the end: a stream would be dropped
        return "--stream and --json cannot be combined (--json prints one object when the answer is complete)"
    sampling = [f for f, v in (("--top-k", a.top_k), ("--top-p", a.top_p), ("--seed", a.seed)) if v is not None]
    if sampling and a.temperature == 0:
        verb = "applies" if len(sampling) == 1 else "apply"
        return f"{', '.join(sampling)} only {verb} when sampling: add --temperature > 0 (0 is greedy)"
    if a.instruction is not None and a.policy not in (None, "instruct"):
        return f"--instruction is the instruct policy's text; --policy {a.policy} would not use it"
    return None


def verdict_line(v, policy: str) -> str:
    """The gate's verdict as one stderr line, flagged or not, so a user sees that the gate ran."""
    if v.flagged:
        return f"[gate: flagged {v.category} ({v.score:.3f}); policy {policy}]"
    return f"[gate: not flagged (top class {v.category}, {v.score:.3f})]"


def main(argv: list[str] | None = None) -> int:
    args = run_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return fail(PROG, problem, EXIT_USAGE)
    from .pipeline import Pipeline

    try:
        pipe = Pipeline.load(args.bundle, backend=args.backend, full_verify=args.full_verify, context=args.context,
                             trusted_keys=args.trusted_key)
        if args.instruction is not None and args.policy is None and pipe.policy != "instruct":
            return fail(PROG, f"--instruction is the instruct policy's text; this bundle's policy is {pipe.policy} "
                              "(add --policy instruct)", EXIT_USAGE)
        stream = pipe.stream(str(args.image) if args.image else None, args.prompt, policy=args.policy,
                             instruction=args.instruction, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             stop=args.stop)
        if args.stream and not args.json:
            if stream.verdict is not None:
                print(verdict_line(stream.verdict, stream.policy), file=sys.stderr, flush=True)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for _ in stream:
                pass
        answer = stream.result
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", EXIT_INTERRUPTED, label=None)
    except Exception as e:       # library errors are typed one-liners; never show a traceback
        return fail(PROG, e)
    if args.json:
        print(json.dumps(answer.to_json(), ensure_ascii=False))
    elif not args.stream:
        if answer.verdict is not None:
            print(verdict_line(answer.verdict, answer.policy), file=sys.stderr)
        print(answer.text)
    t = answer.timings
    if not args.json and "decode_tokens_per_s" in t:
        print(f"[{answer.backend}: ttft {t['ttft_ms']:.0f} ms, {t['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
