"""The cpu target's fused decoder against the traced one it replaced (issue 26): decode and prefill speed,
node count per decode step and the step's scheduling time, at one precision after another, alternated.

For each of ``--variants`` (fp32, int8, int4 at block 128, fp32 ``lm_head``), two decoders exported from the same
random-weight checkpoint as ``scripts/bench_quant.py`` (its ``--_export`` child, ``--form traced|fused``):

* ``traced``: the torch.onnx graph with RMSNorm fused (``export/ort_fusions.py``), KV form "new"
  (``OrtDecoder``: the graph returns the new rows, the runtime copies them into its bucketed arena);
* ``fused``: ``export/fused_decoder.py`` (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits),
  KV form "shared" (``SharedKVDecoder``: the rows are written in place).

Both of one precision are loaded together and measured in alternated rounds (traced, fused, traced, ...):
decode tokens/s (greedy ``generate`` of ``--new-tokens`` after a ``--prompt-len`` prompt, as bench_quant) and
prefill tokens/s (one prefill of ``--prefill-len`` tokens). Then each is profiled (``scripts/profile_decode.py``:
ONNX Runtime's profiler over ``--steps`` decode steps): nodes per step, the summed node time, the mean
``model_run``; their gap is the time ONNX Runtime spends between nodes (scheduling, thread hand-offs). The first
``--check-tokens`` greedy tokens of both forms are compared (same weights: they should agree, fp32 exactly).
One precision's pair is exported (when missing) just before it is measured, and freed before the next is loaded
(fp32: 2 x 4.4 GB); its table row is printed as soon as it is measured.

    python scripts/bench_fused.py                       # TinyLlama-1.1B shape, fp32/int8/int4, 2 threads
    python scripts/bench_fused.py --quick               # toy shape, seconds
    python scripts/bench_fused.py --cleanup             # ... and delete the exports afterwards (GBs)

Prints a Markdown table; ``--out`` writes the JSON.
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
from bench_generate import SEED, SHAPES, machine_facts  # noqa: E402
from bench_quant import decoder_class, exporter_digest  # noqa: E402

FORMS = ("traced", "fused")


def _child(*args: str) -> None:
    subprocess.run([sys.executable, str(HERE / "bench_quant.py"), *args], check=True)


def ensure(work: Path, shape: str, variants: list[str], block: int) -> dict:
    """Export every (variant, form) missing or made by other exporter sources; returns their bundle.json infos."""
    ckpt = work / f"ckpt-{shape}"
    stamp = {"shape": SHAPES[shape], "seed": SEED}
    if not (ckpt / "stamp.json").exists() or json.loads((ckpt / "stamp.json").read_text()) != stamp:
        _child("--_checkpoint", str(ckpt), "--shape", shape)
    digest, infos = exporter_digest(), {}
    for w in variants:
        for form in FORMS:
            out = work / (f"{shape}-{w}" + ("" if w == "fp32" else f"-b{block}") + f"-{form}")
            meta = out / "bundle.json"
            if not meta.exists() or json.loads(meta.read_text()).get("exporter") != digest:
                meta.unlink(missing_ok=True)
                _child("--_export", str(out), "--ckpt", str(ckpt), "--weights", w, "--block-size", str(block),
                       "--form", form, "--shape", shape)
            infos[(w, form)] = {**json.loads(meta.read_text()), "dir": str(out)}
    return infos


class Runner:
    def __init__(self, info: dict, threads: int, capacity: int):
        from tokenizers import Tokenizer

        from safeclip.runtime.backends.ort import make_options

        folder = Path(info["dir"])
        ctx = int(info["model"]["context_length"])
        self.decoder = decoder_class(info).from_manifest(folder, info["graphs"]["decoder"],
                                                          capacity=min(capacity, ctx), context_length=ctx,
                                                          session_options=make_options(threads))
        self.table = np.load(folder / info["embeddings"]["file"], mmap_mode="r", allow_pickle=False)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def decode(self, ids, n: int) -> tuple[float, list[int]]:
        from safeclip.runtime.generate import embed_prompt, generate

        stamps: list[float] = []
        res = generate(self.decoder, self.table, embed_prompt(self.table, ids, dtype=self.decoder.dtype),
                       max_new_tokens=n, eos_token_ids=[], tokenizer=self.tok,
                       on_token=lambda t, piece: stamps.append(time.perf_counter()))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), list(res.token_ids)

    def prefill(self, ids) -> float:
        from safeclip.runtime.generate import embed_prompt

        emb = embed_prompt(self.table, ids, dtype=self.decoder.dtype)
        t0 = time.perf_counter()
        self.decoder.prefill(emb)
        return len(ids) / (time.perf_counter() - t0)


def measure(args) -> dict:
    from profile_decode import profile_folder

    variants = args.variants.split(",")
    rng = np.random.default_rng(SEED)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids, long_ids = rng.integers(5, vocab, args.prompt_len), rng.integers(5, vocab, args.prefill_len)
    cap = max(args.prompt_len + args.new_tokens, args.prefill_len) + 8
    res = {"machine": machine_facts(), "shape": {"name": args.shape, **SHAPES[args.shape]}, "threads": args.threads,
           "block_size": args.block_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "prefill_len": args.prefill_len, "rounds": args.rounds, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime()),
           "loadavg_start": os.getloadavg(), "variants": {}}
    done = {}
    for w in variants:                                       # exported just before they are measured
        infos = ensure(args.work, args.shape, [w], args.block_size)
        done.update(infos)
        runs = {f: Runner(infos[(w, f)], args.threads, cap) for f in FORMS}
        tokens = {f: runs[f].decode(ids, args.check_tokens)[1] for f in FORMS}       # also the warm-up
        for f in FORMS:
            runs[f].prefill(long_ids)
        dec = {f: [] for f in FORMS}
        pre = {f: [] for f in FORMS}
        for _ in range(args.rounds):
            for f in FORMS:                                                          # alternated
                dec[f].append(runs[f].decode(ids, args.new_tokens)[0])
                pre[f].append(runs[f].prefill(long_ids))
        del runs
        same = next((i for i, (a, b) in enumerate(zip(tokens["traced"], tokens["fused"])) if a != b),
                    len(tokens["fused"]))
        row = {"greedy_tokens_equal_before_first_difference": same, "check_tokens": args.check_tokens}
        for f in FORMS:
            info = infos[(w, f)]
            prof = profile_folder(Path(info["dir"]), args.threads, args.steps, args.prompt_len)
            p = prof["profile"]
            row[f] = {"decode_tps": dec[f], "decode_tps_median": statistics.median(dec[f]),
                      "prefill_tps": pre[f], "prefill_tps_median": statistics.median(pre[f]),
                      "nodes_per_step": sum(v["nodes"] for v in p["ops"].values()),
                      "model_run_ms": p["model_run_ms"], "nodes_ms": p["nodes_ms"],
                      "between_nodes_ms": p["model_run_ms"] - p["nodes_ms"], "ops": p["ops"], "loop": prof["loop"],
                      "decoder_bytes": info["decoder_bytes"], "export_s": info["export_s"],
                      "export_peak_rss_bytes": info["export_peak_rss_bytes"], "parity": info["parity"],
                      "fusions": info["graphs"]["decoder"].get("fusions")}
        row["decode_ratio_per_round"] = [b / a for a, b in zip(dec["traced"], dec["fused"])]
        row["prefill_ratio_per_round"] = [b / a for a, b in zip(pre["traced"], pre["fused"])]
        res["variants"][w] = row
        print(markdown_rows(w, row), flush=True)
    res["loadavg_end"] = os.getloadavg()
    if args.cleanup:
        for info in done.values():
            shutil.rmtree(info["dir"], ignore_errors=True)
    return res


HEADER = ("| precision | form | decode tok/s (median) | x traced (per-round median) | prefill tok/s | x traced | "
          "nodes/step | model_run ms | nodes ms | between nodes ms | greedy = |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def markdown_rows(w: str, row: dict) -> str:
    out = []
    for f in FORMS:
        r = row[f]
        ratio_d = statistics.median(row["decode_ratio_per_round"]) if f == "fused" else 1.0
        ratio_p = statistics.median(row["prefill_ratio_per_round"]) if f == "fused" else 1.0
        eq = f"{row['greedy_tokens_equal_before_first_difference']}/{row['check_tokens']}" if f == "fused" else ""
        out.append(f"| {w} | {f} | {r['decode_tps_median']:.2f} | {ratio_d:.2f}x | {r['prefill_tps_median']:.1f} | "
                   f"{ratio_p:.2f}x | {r['nodes_per_step']} | {r['model_run_ms']:.2f} | {r['nodes_ms']:.2f} | "
                   f"{r['between_nodes_ms']:.2f} | {eq} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="the toy shape, 2 rounds")
    ap.add_argument("--variants", default="fp32,int8,int4")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SAFECLIP_BENCH_WORK", "/work/bench_ckpt"))
                    / "quant")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="profiled decode steps")
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--cleanup", action="store_true", help="delete the exports afterwards")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_fused.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.new_tokens, args.block_size, args.prefill_len = "quick", 2, 16, 64, 64
    print(HEADER, flush=True)
    res = measure(args)
    atomic_write_text(args.out, json.dumps(res, indent=1))
    print(f"\n{res['started']}, load {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}, "
          f"{res['machine'].get('cpu', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
