"""Where one decode step's time goes: ONNX Runtime's profiler per op type, plus the Python around the run.

For each bundle folder of ``scripts/bench_quant.py`` (``--work``'s ``<shape>-fp32``, ``<shape>-int4-b128``,
...; each holds ``bundle.json``):

* **loop**: greedy ``generate`` of ``--steps`` tokens through ``OrtDecoder`` as the benchmark runs it; the
  time per decode step (token to token), the part spent inside ``InferenceSession.run_with_iobinding`` and the
  rest (binding 2L+3 inputs/outputs, the arena write of the new KV rows, argmax, detokenisation).
* **profile**: the same steps on a second session with ``SessionOptions.enable_profiling``; the trace's node
  events of the decode runs only (the prefill's are dropped), summed per op type and divided by the steps, next
  to the mean ``model_run`` (the gap is ORT's per-run overhead: thread-pool hand-offs, output binding). The
  profiler adds a little time per node, so the loop's figures, not these, are the speed.

    python scripts/profile_decode.py /work/bench_ckpt/quant/tinyllama-1.1b-int4-b128 --steps 16

Prints a Markdown table per folder; ``--json`` writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SEED  # noqa: E402


class _TimedSession:
    """Proxy for an ``InferenceSession`` that times ``run_with_iobinding``."""

    def __init__(self, sess):
        self._sess, self.times = sess, []

    def run_with_iobinding(self, io, *a):
        t0 = time.perf_counter()
        self._sess.run_with_iobinding(io, *a)
        self.times.append(time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _decoder(folder: Path, info: dict, threads: int, capacity: int, profile_dir: str | None = None,
             options: dict | None = None):
    import onnxruntime as ort

    from bench_quant import decoder_class

    from safeclip.runtime.backends.ort import make_options

    so = make_options(threads)
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, str(v))
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "decode")
    ctx = int(info["model"]["context_length"])
    del ort
    return decoder_class(info).from_manifest(folder, info["graphs"]["decoder"], capacity=min(capacity, ctx),
                                    context_length=ctx, session_options=so)


def loop_times(dec, table, tok, emb, steps: int) -> dict:
    from safeclip.runtime.generate import generate

    timed = _TimedSession(dec.session)
    dec.session = timed
    stamps: list[float] = []
    generate(dec, table, emb, max_new_tokens=steps + 1, eos_token_ids=[], tokenizer=tok,
             on_token=lambda t, piece: stamps.append(time.perf_counter()))
    dec.session = timed._sess
    step = np.diff(stamps)                                   # token k -> k+1: one decode step each
    run = np.asarray(timed.times[1:])                        # [0] is the prefill
    return {"step_ms": 1e3 * float(np.median(step)), "run_ms": 1e3 * float(np.median(run)),
            "outside_run_ms": 1e3 * float(np.median(step[: len(run)] - run[: len(step)]))}


def profile_ops(folder: Path, info: dict, threads: int, capacity: int, table, emb, steps: int,
                options: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dec = _decoder(folder, info, threads, capacity, tmp, options)
        logits = dec.prefill(emb)
        for _ in range(steps):
            logits = dec.decode_one_token(table[int(np.argmax(logits))])
        path = dec.session.end_profiling()
        events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode_runs = runs[1:]                                   # runs[0]: the prefill
    start = decode_runs[0]["ts"]
    per_op: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e["args"].get("op_name", "?")
        per_op[op] += e["dur"]
        count[op] += 1
        per_node[e["name"][: -len("_kernel_time")]] += e["dur"]
    n = len(decode_runs)
    ops = {op: {"ms": per_op[op] / n / 1e3, "nodes": count[op] // n}
           for op in sorted(per_op, key=per_op.get, reverse=True)}
    top = {k: per_node[k] / n / 1e3 for k in sorted(per_node, key=per_node.get, reverse=True)[:8]}
    return {"steps": n, "model_run_ms": statistics.mean(r["dur"] for r in decode_runs) / 1e3,
            "nodes_ms": sum(per_op.values()) / n / 1e3, "ops": ops, "top_nodes_ms": top}


def profile_folder(folder: Path, threads: int, steps: int, prompt_len: int, options: dict | None = None) -> dict:
    from tokenizers import Tokenizer

    from safeclip.runtime.generate import embed_prompt

    info = json.loads((folder / "bundle.json").read_text())
    table = np.load(folder / info["embeddings"]["file"], mmap_mode="r", allow_pickle=False)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = np.random.default_rng(SEED).integers(5, table.shape[0], size=prompt_len)
    cap = prompt_len + steps + 8
    dec = _decoder(folder, info, threads, cap, None, options)
    emb = embed_prompt(table, ids, dtype=dec.dtype)
    loop_times(dec, table, tok, emb, 4)                      # warm-up
    loop = loop_times(dec, table, tok, emb, steps)
    del dec
    prof = profile_ops(folder, info, threads, cap, table, emb, steps, options)
    return {"folder": str(folder), "weights": info["weights"], "loop": loop, "profile": prof}


def markdown(r: dict) -> str:
    lp, pr = r["loop"], r["profile"]
    rows = [f"**{r['weights']}** ({Path(r['folder']).name}): step {lp['step_ms']:.2f} ms = run "
            f"{lp['run_ms']:.2f} + outside the run {lp['outside_run_ms']:.2f}; profiled model_run "
            f"{pr['model_run_ms']:.2f} ms, nodes {pr['nodes_ms']:.2f} ms ({pr['steps']} steps)", "",
            "| op type | nodes/step | ms/step | share of nodes |", "|---|---:|---:|---:|"]
    for op, v in pr["ops"].items():
        rows.append(f"| {op} | {v['nodes']} | {v['ms']:.3f} | {100 * v['ms'] / pr['nodes_ms']:.1f}% |")
    rows += ["", "top nodes (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in pr["top_nodes_ms"].items())]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+", help="bundle folders of bench_quant.py (with bundle.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="an ORT session config entry (repeatable), e.g. session.intra_op.allow_spinning=0")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    bad = [f for f in args.folders if not (f / "bundle.json").is_file()]
    if bad:
        print(f"error: {bad[0]} has no bundle.json (a bench_quant.py export folder)", file=sys.stderr)
        return 2
    options = dict(c.split("=", 1) for c in args.config)
    out = [profile_folder(f, args.threads, args.steps, args.prompt_len, options) for f in args.folders]
    for r in out:
        print(markdown(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
