"""This project's cpu decoder against the CPU engines a user would pick instead: llama.cpp and ONNX Runtime GenAI.

Not CI. One run on one machine, same random weights everywhere (issue 26):

* One random-weight checkpoint (``scripts/bench_quant.py``'s LLaVA at ``--shape``, default TinyLlama-1.1B:
  hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocabulary 32000) and, from the same fp16 tensors, a
  plain Llama folder with the Llama-2 tokenizer; converted for every engine by ``scripts/peer_build.py``
  (models and settings: its ``MODELS``): this project's cpu bundles the project's way (fp32, int8, int4, block
  128, fp32 lm_head; int8 / int4 with ``--quantize-lm-head``; int4 with ``--lm-head-bits 8``), llama.cpp
  (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, ``llama_model_quantize`` to Q8_0 / Q4_0; Q4_0 with
  its default Q6_K output layer and with an F32 one) and ONNX Runtime GenAI (its model builder: defaults, and
  matched to ours: our block size, fp32 lm_head). An engine that is not installed is skipped with one line.
* Timing: models are grouped by precision; in each group every model runs in its own warm worker process
  (``scripts/peer_workers.py``) with ``--threads`` threads, and rounds alternate all of them (the order
  rotates each round): greedy decode of ``--new-tokens`` after a ``--prompt-len`` random prompt, then prefill
  of ``--prefill-len`` tokens on an empty cache. Medians over ``--rounds``; "x ours" is the median over rounds
  of the per-round ratio to this project's model of the group (same round, so the machine's drift between
  rounds cancels). Busy threads: per request, the worker's threads that were on a CPU for at least half its
  wall time (``/proc/PID/task/*/stat``). Peak RSS: the worker's ``VmHWM`` (mmapped weights count). Disk:
  the files the engine loads.
* Greedy tokens: the first decode of each model against ours in its group (the fp32 models must agree: the
  proof that every engine has the same weights).
* lm_head error (``--lm-head-positions``): this project's bundles teacher-forced over real text (README.md
  tokenised with the Llama-2 tokenizer), logits at every position against the fp32 bundle and against the same
  body with an fp32 lm_head: max |dlogits|, mean |dlogits|, top-1 agreement.

Install (from a fresh checkout, into the project's venv)::

    pip install -e '.[export]' onnxruntime-genai
    # llama.cpp: compiles llama.cpp; build the wheel once and keep it. Without its tools, examples, server and
    # multimodal library it is 140 compile steps, ~8 min on 2 quiet cores (2026-12-06; the full build: 178
    # steps, over 1.5 h on 2 shared cores). pip's build isolation fetches scikit-build-core from PyPI.
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_MTMD=OFF" \
        pip wheel --no-deps llama-cpp-python==0.3.36 -w ~/wheels
    pip install ~/wheels/llama_cpp_python-0.3.36-*.whl
    python scripts/bench_peers.py                 # ~30 min on 2 cores with the builds (2026-12-06); 29 GB, 14 GB RAM
    python scripts/bench_peers.py --quick         # a toy shape, minutes

The sdist (``convert_hf_to_gguf.py``, its ``gguf-py`` and the Llama-2 vocabulary) is fetched with ``pip
download`` unless ``--sdist`` names it. JSON goes to ``--out``, a Markdown table to stdout; ``--clean`` deletes
``--work`` afterwards (it holds tens of GB at TinyLlama shape).
"""
from __future__ import annotations

import argparse
import datetime
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
from peer_build import MODELS, ensure, installed, skip_line  # noqa: E402

PRECISIONS = ("fp32", "int8", "int4")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=("tinyllama-1.1b", "quick-32k"))
    ap.add_argument("--quick", action="store_true", help="the toy shape, fewer rounds and positions")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SAFECLIP_BENCH_WORK", "/work/bench_ckpt"))
                    / "peers")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names of peer_build.MODELS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=128, help="this project's int8/int4 block")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lm-head-positions", type=int, default=300, help="0: skip the lm_head error")
    ap.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python's sdist (default: pip download)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_peers.json"))
    ap.add_argument("--clean", action="store_true", help="delete --work after the run")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.new_tokens, args.prefill_len, args.lm_head_positions = "quick-32k", 2, 8, 64, 40
        args.block_size = 64        # the toy shape's MLP width (704) is not a multiple of 128
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)} (supported: {', '.join(MODELS)})")
    if args.rounds < 1 or args.new_tokens < 2 or args.prefill_len < 1 or args.threads < 1:
        ap.error("--rounds, --threads and --prefill-len must be >= 1 and --new-tokens >= 2")
    args.models = names
    return args


# -- statistics ----------------------------------------------------------------------------------------------------
def per_round_ratios(samples: dict[str, list[float]], ref: str) -> dict[str, float]:
    """Median over rounds of ``samples[m][r] / samples[ref][r]`` for every model ``m`` (rounds paired)."""
    base = samples[ref]
    return {m: statistics.median(x / b for x, b in zip(v, base, strict=True)) for m, v in samples.items()}


def group_reference(names: list[str]) -> str | None:
    """This project's model of a precision group (the one with the fp32 lm_head, else the first of ours)."""
    ours = [n for n in names if MODELS[n].engine == "ours"]
    return next((n for n in ours if not quantised_head(n)), ours[0] if ours else None)


def quantised_head(name: str) -> bool:
    b = dict(MODELS[name].build)
    return bool(b.get("lm_head") or b.get("lm_head_bits"))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files an engine loads (build stamps and logs left out)."""
    skip = {".done", "bundle.json"}
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and f.name not in skip and not f.name.startswith(".logits-"))


# -- timing ---------------------------------------------------------------------------------------------------------
def time_group(names: list[str], folders: dict[str, Path], args, rng) -> dict:
    from peer_workers import Worker

    capacity = max(args.prompt_len + args.new_tokens, args.prefill_len) + 16
    prompt = [int(t) for t in rng.integers(5, 32000, size=args.prompt_len)]
    long = [int(t) for t in rng.integers(5, 32000, size=args.prefill_len)]
    workers = {}
    try:
        for n in names:
            print(f"bench_peers: loading {n}", flush=True)
            workers[n] = Worker(MODELS[n].engine, folders[n], args.threads, capacity, args.work / f"{n}.worker.log")
        first = {n: w.request(op="decode", prompt=prompt, n=args.new_tokens) for n, w in workers.items()}
        for w in workers.values():
            w.request(op="prefill", ids=long)                                       # warm-up
        dec = {n: [] for n in names}
        pre = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                dec[n].append(workers[n].request(op="decode", prompt=prompt, n=args.new_tokens))
            for n in order:
                pre[n].append(workers[n].request(op="prefill", ids=long))
            print(f"bench_peers: round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {dec[n][-1]['tps']:.1f}/{pre[n][-1]['tps']:.0f}" for n in names), flush=True)
        rss = {n: w.peak_rss_bytes() for n, w in workers.items()}
        load = {n: w.ready["load_s"] for n, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    ref = group_reference(names)
    d_tps = {n: [x["tps"] for x in dec[n]] for n in names}
    p_tps = {n: [x["tps"] for x in pre[n]] for n in names}
    d_x = per_round_ratios(d_tps, ref) if ref else {}
    p_x = per_round_ratios(p_tps, ref) if ref else {}
    out = {}
    for n in names:
        agree = None
        if ref:
            a, b = first[n]["tokens"], first[ref]["tokens"]
            agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out[n] = {"label": MODELS[n].label, "engine": MODELS[n].engine, "decode_tps": d_tps[n],
                  "decode_tps_median": statistics.median(d_tps[n]), "decode_x_ours": d_x.get(n),
                  "prefill_tps": p_tps[n], "prefill_tps_median": statistics.median(p_tps[n]),
                  "prefill_x_ours": p_x.get(n),
                  "decode_busy_threads": statistics.median(x["busy"] for x in dec[n]),
                  "decode_cpus": statistics.median(x["cpus"] for x in dec[n]),
                  "prefill_busy_threads": statistics.median(x["busy"] for x in pre[n]),
                  "prefill_cpus": statistics.median(x["cpus"] for x in pre[n]),
                  "greedy_tokens_equal_to_ours": agree, "tokens": first[n]["tokens"],
                  "peak_rss_bytes": rss[n], "load_s": load[n], "disk_bytes": folder_bytes(folders[n])}
    return {"reference": ref, "models": out}


# -- the lm_head error ----------------------------------------------------------------------------------------------
def text_tokens(llama_dir: Path, n: int) -> np.ndarray:
    """``n`` + 1 token ids of real text: this repository's README.md, Llama-2 tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    ids = tok.encode((HERE.parent / "README.md").read_text()).ids
    if len(ids) < n + 1:
        raise ValueError(f"README.md has {len(ids)} tokens, fewer than --lm-head-positions + 1 = {n + 1}")
    return np.asarray(ids[:n + 1])


def teacher_forced_logits(folder: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    """Logits [P, V] at every position of ``ids`` (one decode step per token), this project's runtime; kept in
    the bundle's folder (a rebuilt bundle is a new folder) for the next run."""
    import hashlib

    from bench_quant import Runtime

    cache = folder / f".logits-{hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)

    info = {**json.loads((folder / "bundle.json").read_text()), "dir": str(folder)}
    rt = Runtime(folder, info, threads, len(ids) + 8)
    from safeclip.runtime.generate import embed_prompt

    dec, emb = rt.decoder, embed_prompt(rt.table, ids, dtype=rt.decoder.dtype)         # [P, D]
    out = [np.array(dec.prefill(emb[:1]), np.float32)]
    for row in emb[1:]:
        out.append(np.array(dec.decode_one_token(row), np.float32))
    logits = np.stack(out)
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, logits)
    tmp.replace(cache)
    return logits


def logits_error(got: np.ndarray, ref: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - ref)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "ref_logit_std": float(ref.std()), "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "positions": int(ref.shape[0])}


def lm_head_error(folders: dict[str, Path], llama_dir: Path, args) -> dict:
    ids = text_tokens(llama_dir, args.lm_head_positions)
    if "ours-fp32" not in folders:
        return {}
    ref = teacher_forced_logits(folders["ours-fp32"], ids, args.threads)
    res, cache = {}, {}
    ours = [n for n in MODELS if MODELS[n].engine == "ours" and MODELS[n].precision != "fp32"]
    for n in sorted(ours, key=quantised_head):                  # each body with the fp32 head first
        if n in folders:
            cache[n] = teacher_forced_logits(folders[n], ids, args.threads)
            body = group_reference([m for m in ours if MODELS[m].precision == MODELS[n].precision])
            res[n] = {"vs_fp32": logits_error(cache[n], ref)}
            if n != body and body in cache:
                res[n]["vs_fp32_head"] = logits_error(cache[n], cache[body])
    return {"positions": len(ids), "text": "README.md", "models": res}


# -- the report -----------------------------------------------------------------------------------------------------
def machine() -> dict:
    from bench_generate import machine_facts

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Hypervisor vendor")
    facts = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())
             if k.strip() in keep}
    flags = next((line for line in lscpu.splitlines() if line.startswith("Flags:")), "")
    facts["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return {**machine_facts(), "lscpu": facts}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def markdown(res: dict) -> str:
    rows = ["| precision | model | decode tok/s | x ours | prefill tok/s | x ours | busy threads decode / prefill "
            "| greedy tokens = ours | peak RSS GB | disk GB |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for p, g in res["groups"].items():
        for n, m in g["models"].items():
            x = (lambda v: "-" if v is None else f"{v:.2f}x")
            rows.append(f"| {p} | {m['label']} | {m['decode_tps_median']:.2f} | {x(m['decode_x_ours'])} | "
                        f"{m['prefill_tps_median']:.0f} | {x(m['prefill_x_ours'])} | "
                        f"{m['decode_busy_threads']:g} ({m['decode_cpus']:.2f} CPUs) / {m['prefill_busy_threads']:g} "
                        f"({m['prefill_cpus']:.2f}) | {m['greedy_tokens_equal_to_ours']}/{len(m['tokens'])} | "
                        f"{m['peak_rss_bytes'] / 1e9:.2f} | {m['disk_bytes'] / 1e9:.3f} |")
    lines = rows + [""] + res["skipped"]
    lh = res.get("lm_head_error") or {}
    if lh.get("models"):
        lines += ["", f"lm_head error, teacher-forced over {lh['positions']} positions of {lh['text']}:", "",
                  "| model | vs fp32 bundle: max / mean abs dlogits, top-1 agree | vs same body, fp32 lm_head |",
                  "|---|---|---|"]
        for n, e in lh["models"].items():
            f = (lambda d: "-" if d is None else
                 f"{d['max_abs']:.3f} / {d['mean_abs']:.4f}, {100 * d['top1_agree']:.1f}%")
            lines.append(f"| {n} | {f(e['vs_fp32'])} | {f(e.get('vs_fp32_head'))} |")
        lines.append(f"(fp32 logits' std: {next(iter(lh['models'].values()))['vs_fp32']['ref_logit_std']:.3f})")
    m = res["machine"]
    lines += ["", f"{res['shape']} shape, random weights, {res['threads']} threads each, {res['rounds']} alternated "
              f"rounds, decode {res['new_tokens']} tokens after {res['prompt_len']}, prefill {res['prefill_len']}; "
              f"{res['date']}; load average {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}; "
              f"{m['lscpu'].get('Model name', m['cpu'])} ({', '.join(m['lscpu']['isa'])}); {res['versions']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    skipped = [skip_line(e) for e in dict.fromkeys(MODELS[n].engine for n in args.models) if not installed(e)]
    for s in skipped:
        print(s, flush=True)
    t0, la0 = time.time(), os.getloadavg()
    folders = ensure([MODELS[n] for n in args.models], args.work, args.shape, args.block_size, args.threads,
                     args.sdist)
    rng = np.random.default_rng(20250302)
    groups = {}
    for p in PRECISIONS:
        names = [n for n in args.models if n in folders and MODELS[n].precision == p]
        if names:
            groups[p] = time_group(names, folders, args, rng)
    lm = lm_head_error(folders, args.work / f"llama-{args.shape}", args) if args.lm_head_positions else {}
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(sys.argv), "shape": args.shape, "threads": args.threads, "rounds": args.rounds,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
           "loadavg_start": la0, "loadavg_end": os.getloadavg(), "wall_s": time.time() - t0,
           "machine": machine(), "versions": versions(), "skipped": skipped, "groups": groups, "lm_head_error": lm}
    atomic_write_text(args.out, json.dumps(res, indent=1))
    print(markdown(res))
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as e:
        print(f"bench_peers: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
