"""Time to first token of a first LLaVA turn (one image: 576 image tokens, plus the question) on the cpu target,
the decoder as ONNX Runtime's fused operators (the cpu target's graph now) against the traced graph it replaced
(issue 26).

One random-weight checkpoint at ``--shape`` (default TinyLLaVA-1.5B: CLIP ViT-L/14-336 tower + TinyLlama-1.1B,
``scripts/realshape.py``, fp16 safetensors as published) with its CLIP, exported twice per ``--weights``
precision by ``safeclip-export``'s own code (``export.bundle.export_bundle``, target ``cpu``, parity gate on):

* ``traced``: ``ExportOptions(fused_ops=False)``: torch.onnx trace with RMSNorm fused, KV form "new";
* ``fused``: the cpu target's default: GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits, KV
  form "shared".

Both bundles of a precision are opened together (``Pipeline.load``, ``--threads`` each) and measured in
alternated rounds (traced, fused, traced, ...): one first turn each, ``pipe.generate(image, question)``, with the
image cache emptied and the decoder's cached conversation forgotten before it (a cold first turn, as a kiosk's
next visitor gets it). Reported per bundle: the answer's own timings (``preprocess_ms``, ``vision_gate_ms``,
``prefill_ms``, ``ttft_ms`` = their sum, ``decode_tokens_per_s`` over ``--new-tokens``), medians over rounds, and
the median of the per-round ratios traced / fused of TTFT and prefill (above 1: the fused graph is faster).
The gate's verdict and the greedy tokens of the two forms are compared (same weights).

    python scripts/bench_ttft.py                              # TinyLLaVA-1.5B shape, int4, 5 rounds
    python scripts/bench_ttft.py --weights int4,int8 --cleanup
    python scripts/bench_ttft.py --quick                      # toy shape, seconds

Exports are kept under ``--work`` and reused while the exporter's sources are unchanged, or always with
``--keep-exports`` (``--cleanup`` deletes them afterwards: 2 x 2.3 GB at int4). Prints a Markdown table;
writes ``--out`` (JSON).
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

from safeclip.runtime.manifest import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import realshape  # noqa: E402
from bench_generate import machine_facts  # noqa: E402
from bench_quant import exporter_digest  # noqa: E402

FORMS = ("traced", "fused")
QUESTION = "What is in the picture? Describe it in one sentence."


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllava-1.5b", choices=("tinyllava-1.5b", "tiny"))
    ap.add_argument("--weights", default="int4", help="comma-separated: fp32, int8, int4")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "house.jpg")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SAFECLIP_BENCH_WORK", "/work/bench_ckpt"))
                    / "ttft")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_ttft.json"))
    ap.add_argument("--cleanup", action="store_true", help="delete the exports (not the checkpoint) afterwards")
    ap.add_argument("--keep-exports", action="store_true", help="reuse exports made by other exporter sources "
                    "(each result records the digest of the sources that made it)")
    ap.add_argument("--quick", action="store_true", help="the toy shape, 2 rounds")
    ap.add_argument("--_export", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_form", choices=FORMS, help=argparse.SUPPRESS)
    ap.add_argument("--_w", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.new_tokens, args.block_size = "tiny", 2, 4, 32
    args.weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    bad = [w for w in args.weights if w not in ("fp32", "int8", "int4")]
    if bad:
        ap.error(f"unknown --weights {', '.join(bad)} (supported: fp32, int8, int4)")
    if args.rounds < 1 or args.new_tokens < 1 or args.threads < 1:
        ap.error("--rounds, --new-tokens and --threads must be >= 1")
    if not args.image.is_file():
        ap.error(f"--image {args.image} is not a file")
    return args


# -- checkpoints and exports (child processes: each export's memory is returned when it ends) -------------------
def checkpoints(work: Path, shape: str) -> tuple[Path, Path]:
    llava, clip = work / f"ckpt-{shape}", work / f"clip-{shape}"
    for kind, folder, spec in (("llava", llava, realshape.llava_spec(shape, "float16", "legacy", None, 0)),
                               ("clip", clip, realshape.clip_spec(shape, "float16", 0))):
        if not realshape.stamp_matches(folder, spec):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"bench_ttft: writing the {kind} checkpoint {folder}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(HERE / "realshape.py"), "--kind", kind, "--shape", shape,
                            "--dtype", "float16", "--out", str(folder)], check=True)
    return llava, clip


def export_child(args) -> int:
    from safeclip.export.bundle import ExportOptions, export_bundle

    out = args._export
    llava, clip = checkpoints(args.work, args.shape)
    opts = ExportOptions(model=str(llava), clip=str(clip), target="cpu", out=out,
                         weights=None if args._w == "fp32" else args._w,
                         block_size=None if args._w == "fp32" else args.block_size,
                         fused_ops=args._form == "fused")
    t0 = time.perf_counter()
    rep = export_bundle(opts, progress=lambda s: print(f"  {out.name}: {s}", file=sys.stderr, flush=True))
    worst = max((err / p.atol[k] for p in rep.parity for k, err in p.max_abs_err.items() if p.atol.get(k)),
                default=0.0)
    atomic_write_text(stamp_of(out), json.dumps({"digest": exporter_digest(), "form": args._form, "weights": args._w,
                                                 "export_s": time.perf_counter() - t0,
                                                 "parity_worst_of_tolerance": worst}))
    return 0


def stamp_of(bundle: Path) -> Path:
    """What made a bundle (beside it: a file inside would be one the manifest does not list)."""
    return bundle.with_name(bundle.name + ".stamp.json")


def ensure(args, w: str, form: str) -> Path:
    out = args.work / f"{args.shape}-{w}-{form}"
    stamp = stamp_of(out)
    if out.is_dir() and stamp.exists() and (args.keep_exports or
                                            json.loads(stamp.read_text()).get("digest") == exporter_digest()):
        return out
    shutil.rmtree(out, ignore_errors=True)
    print(f"bench_ttft: exporting {out.name}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--_export", str(out), "--_form", form, "--_w", w,
                    "--shape", args.shape, "--block-size", str(args.block_size), "--work", str(args.work)],
                   check=True)
    return out


# -- measurement ---------------------------------------------------------------------------------------------------
def first_turn(pipe, image, question: str, new_tokens: int) -> dict:
    pipe.image_cache.clear()                    # a new visitor: no cached image features or verdict
    pipe.language_model.owner = None            # ... and no conversation cached in the decoder
    ans = pipe.generate(image, question, max_new_tokens=new_tokens)
    t = ans.timings
    return {k: t.get(k) for k in ("preprocess_ms", "vision_gate_ms", "prefill_ms", "ttft_ms",
                                  "decode_tokens_per_s")} | {
        "prompt_tokens": ans.prompt_tokens, "token_ids": [int(x) for x in ans.token_ids],
        "verdict": None if ans.verdict is None else [ans.verdict.flagged, ans.verdict.category]}


def measure(args, w: str, folders: dict[str, Path]) -> dict:
    from PIL import Image

    from safeclip.runtime.pipeline import Pipeline

    image = Image.open(args.image).convert("RGB")
    pipes = {f: Pipeline.load(folders[f], backend="onnxruntime", threads=args.threads) for f in FORMS}
    for f, p in pipes.items():
        first_turn(p, image, args.question, 2)                  # warm-up (allocations, first-run kernels)
    rounds: dict[str, list[dict]] = {f: [] for f in FORMS}
    for r in range(args.rounds):
        for f, p in pipes.items():
            rounds[f].append(first_turn(p, image, args.question, args.new_tokens))
        print(f"bench_ttft: {w} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{f} ttft {rounds[f][-1]['ttft_ms']:.0f} ms (prefill {rounds[f][-1]['prefill_ms']:.0f})"
            for f in FORMS), file=sys.stderr, flush=True)
    del pipes
    out = {}
    for f in FORMS:
        rs = rounds[f]
        out[f] = {k: statistics.median(r[k] for r in rs) for k in
                  ("preprocess_ms", "vision_gate_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")}
        out[f].update(prompt_tokens=rs[0]["prompt_tokens"], verdict=rs[0]["verdict"], rounds=rs)
        stamp = json.loads(stamp_of(folders[f]).read_text())
        out[f].update(export_s=stamp["export_s"], parity_worst_of_tolerance=stamp["parity_worst_of_tolerance"],
                      exporter_digest=stamp["digest"])
    for k in ("ttft_ms", "prefill_ms"):
        out["fused"][f"speedup_{k}"] = statistics.median(
            t[k] / u[k] for t, u in zip(rounds["traced"], rounds["fused"], strict=True))
    out["fused"]["decode_ratio"] = statistics.median(
        u["decode_tokens_per_s"] / t["decode_tokens_per_s"] for t, u in zip(rounds["traced"], rounds["fused"]))
    a, b = rounds["traced"][0]["token_ids"], rounds["fused"][0]["token_ids"]
    out["fused"]["tokens_equal"] = f"{sum(x == y for x, y in zip(a, b))}/{max(len(a), len(b))}"
    out["fused"]["same_verdict"] = rounds["traced"][0]["verdict"] == rounds["fused"][0]["verdict"]
    return out


def table(results: dict) -> str:
    rows = ["| precision | decoder graph | prompt tokens | preprocess ms | vision+gate ms | prefill ms | TTFT ms | "
            "TTFT traced/fused (per-round median) | prefill traced/fused | decode tok/s | fused/traced decode | "
            "greedy tokens equal | same verdict |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w, res in results.items():
        for f in FORMS:
            r = res[f]
            extra = (f"**{r['speedup_ttft_ms']:.2f}x** | {r['speedup_prefill_ms']:.2f}x | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['decode_ratio']:.2f}x | {r['tokens_equal']} | "
                     f"{r['same_verdict']}" if f == "fused" else
                     f"1.00x | 1.00x | {r['decode_tokens_per_s']:.2f} | 1.00x | | ")
            rows.append(f"| {w} | {f} | {r['prompt_tokens']} | {r['preprocess_ms']:.0f} | {r['vision_gate_ms']:.0f} "
                        f"| {r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | {extra} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._export:
        return export_child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {}
    for w in args.weights:
        folders = {f: ensure(args, w, f) for f in FORMS}
        results[w] = measure(args, w, folders)
        if args.cleanup:
            for f in folders.values():
                shutil.rmtree(f, ignore_errors=True)
                stamp_of(f).unlink(missing_ok=True)
    print(table(results))
    facts = {**machine_facts(), "started": t0, "load_before": load0, "load_after": os.getloadavg()[0],
             "shape": args.shape, "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
             "block_size": args.block_size, "question": args.question, "image": args.image.name}
    print(f"\n{args.shape} shape, random weights, {args.threads} threads, {args.rounds} alternated rounds; {t0}; "
          f"load average {facts['load_before']:.2f} -> {facts['load_after']:.2f}; {facts['cpu']}")
    atomic_write_text(args.out, json.dumps({"machine": facts, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
