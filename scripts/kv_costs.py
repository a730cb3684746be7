"""What the KV cache costs per decode step: bytes copied and step time, the one-arena design against the old one.

Two uses:

* :func:`kv_update_costs` (``bench_generate.py``, ``tests/test_generate.py``): for an ``OrtDecoder`` of this
  runtime, per cache length P, one decode step's time, its rebinding time, the bytes the runtime copies (the
  step's new rows into the arena, ``runtime/backends/arena.py``), what the old graph's Concat rewrote per step
  at that P (``concat_bytes``) and a host copy of that many bytes, and the amortised repack bytes per token.
  It reaches into the decoder's arena and binding step to time them apart, which only a benchmark should do.
  CPU arena only (on a GPU the copies are device-side; time whole steps there instead).
* ``python scripts/kv_costs.py [--model demo|tinyllama] [--layers N] [--lengths ...]``: the same model exported
  and served by this tree and by the old design (``--old-ref``, default the commit before the one-arena
  runtime: its decoder returned ``present = concat(past, new)`` and the runtime kept two ping-pong arenas),
  each in its own subprocess (the old tree is checked out with ``git archive`` into a temporary folder and
  imported instead of the installed package), alternated ``--rounds`` times; prints a Markdown table of the
  best step time per length. ``tinyllama`` is the TinyLlama-1.1B text shape (hidden 2048, 32 heads / 4 KV
  heads, head dim 64, MLP 5632, vocabulary 32000) with ``--layers`` of its 22 layers (default 4: the per-step
  KV work per layer is the shape's, and the process stays within ~3 GB).

New-design steps are timed at three buckets: P+1 rows (right after a repack to the exact length: attention
reads P+1 rows), 2P (just after a doubling: the most rows a bucket makes attention read) and the capacity C
(the alternative design that binds the whole arena with a mask and never repacks: it reads C rows every step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["best_of", "kv_update_costs", "amortised_repack_bytes"]

OLD_REF = "11e3aad"            # the last commit with the two-arena design (present = concat(past, new))
ROOT = Path(__file__).resolve().parents[1]


def best_of(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def amortised_repack_bytes(decoder, prompt: int = 1) -> float:
    """Bytes a generation from ``prompt`` tokens to the capacity moves in repacks, per generated token (the
    arena's own growth rule, without running the graph)."""
    from safeclip.runtime.backends.arena import HostArena

    kv, C = decoder.kv, decoder.capacity
    a = HostArena(2 * kv.num_layers, kv.num_kv_heads, kv.head_dim, C, decoder.dtype)   # np.zeros: never touched
    a._repack = lambda rows, old, new: None                         # bookkeeping only: no moves are made
    a.bucket = prompt
    for n in range(prompt, C):
        a.ensure(n, n + 1)
    return a.copied / max(1, C - prompt)


def kv_update_costs(decoder, lengths: Sequence[int] = (0, 256, 1024), repeats: int = 5) -> dict:
    """Per decode step at each cache length P (lists aligned with ``lengths``; seconds, best of ``repeats``):

    * ``step_s``: one ``decode_one_token`` at P (cache content is stale: timing only);
    * ``bind_s``: rebinding the 4L+3 inputs/outputs for that step (Python + ORT binding overhead);
    * ``kv_bytes``: bytes the runtime copies in that step (the new row of every layer's key and value);
    * ``concat_bytes``: what the old graph's Concat rewrote per step (present = P+1 rows, all layers), and
      ``kv_copy_s`` a host memcpy of that many bytes;
    * ``repack_bytes_per_token``: the arena's repacks over a generation to the capacity, per token;
    * ``weights_bytes`` and ``weights_copy_s``: the graph's weight bytes and the time one memcpy of that many
      bytes takes at the measured copy bandwidth (a lower bound on the per-step weight read);
    * ``copy_GBps``: that bandwidth.
    """
    from safeclip.runtime.backends.base import ContextError

    if decoder.device != "cpu":
        raise ValueError("kv_update_costs measures host copies: use a CPU decoder")
    kv, isz = decoder.kv, decoder.dtype.itemsize
    row = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * isz           # one position, every layer's k, v
    out = {k: [] for k in ("lengths", "step_s", "bind_s", "kv_bytes", "concat_bytes", "kv_copy_s")}
    probe = np.zeros(decoder.hidden_size, decoder.dtype)
    for P in lengths:
        if not 0 <= P < decoder.capacity:
            raise ContextError(f"length {P} must be below the cache capacity {decoder.capacity}")

        def step():
            decoder.reset(P)
            decoder.decode_one_token(probe)

        def bind():
            decoder.reset(P)
            decoder._bind(decoder._token)

        step()                                                                # warm-up
        before = decoder.arena.copied
        decoder.reset(P)
        decoder.decode_one_token(probe)
        src = np.ones((P + 1) * row, np.uint8)
        dst = np.empty_like(src)
        out["lengths"].append(int(P))
        out["kv_bytes"].append(int(decoder.arena.copied - before))
        out["step_s"].append(best_of(step, repeats))
        out["bind_s"].append(best_of(bind, repeats))
        out["concat_bytes"].append(int(src.nbytes))
        out["kv_copy_s"].append(best_of(lambda: np.copyto(dst, src), repeats))
    decoder.reset()
    buf = np.ones(16 << 20, np.uint8)
    dst = np.empty_like(buf)
    bw = buf.nbytes / best_of(lambda: np.copyto(dst, buf), repeats)
    wb = int(decoder.weights_bytes or 0)
    out.update(weights_bytes=wb, weights_copy_s=wb / bw, copy_GBps=bw / 1e9,
               repack_bytes_per_token=amortised_repack_bytes(decoder))
    return out


# -- old vs new, one subprocess per design ---------------------------------------------------------------------

def _model(name: str, layers: int, seed: int = 0):
    """(llava model, tokenizer-like) for ``name``, the same weights in every process (seeded)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    if name == "demo":
        from transformers import AutoTokenizer

        from safeclip.export.demo import build_demo
        llava_dir, _ = build_demo(Path(tempfile.mkdtemp(prefix="kvcosts-demo-")))
        return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval(), AutoTokenizer.from_pretrained(llava_dir)
    text = LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, image_seq_length=576)

    class Tok:                                               # export_decoder only names the image token
        def convert_ids_to_tokens(self, i):
            return "<image>"

    return LlavaForConditionalGeneration(cfg).eval(), Tok()


def worker(args) -> dict:
    """Export ``args.model`` with the importable ``safeclip`` (this tree or the old one) and time its steps."""
    import gc

    from safeclip.export.decoder import export_decoder
    from safeclip.runtime.graph_spec import KVSpec
    from safeclip.runtime.backends.ort import OrtDecoder

    out = Path(args.out)
    if not (out / "frag.json").is_file():
        model, tok = _model(args.model, args.layers)
        frag = export_decoder(model, out, tokenizer=tok)
        heads = model.config.get_text_config().num_attention_heads
        (out / "frag.json").write_text(json.dumps({**frag["graphs"]["decoder"], "heads": heads}))
        del model, frag
        gc.collect()
    g = json.loads((out / "frag.json").read_text())
    groups = g["heads"] // g["kv"]["num_kv_heads"]
    dec = OrtDecoder(out / g["file"], KVSpec.from_manifest(g["kv"]), capacity=args.capacity)
    kv, new = dec.kv, hasattr(dec, "arena")
    row = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * dec.dtype.itemsize
    probe = np.zeros(dec.hidden_size, dec.dtype)
    res = {"design": "one arena" if new else "two arenas (concat)", "lengths": args.lengths, "step_s": {},
           "copied_bytes": [], "kv_memory_bytes": dec.kv_bytes if new else 2 * 2 * kv.num_layers *
           kv.num_kv_heads * dec.capacity * kv.head_dim * dec.dtype.itemsize}
    buckets = {"P+1": lambda P: P + 1, "2P": lambda P: min(dec.capacity, max(2 * P, P + 1)),
               "C": lambda P: dec.capacity} if new else {"-": None}      # C: the whole capacity bound, masked

    def step(P, size):
        dec.reset(P)
        if size:
            dec.arena.bucket = size(P)
        dec.decode_one_token(probe)

    for label, size in buckets.items():                              # samples interleaved over the lengths,
        res["step_s"][label] = [[] for _ in args.lengths]             # so load changes hit every length alike
        for P in args.lengths:
            step(P, size)                                             # warm-up
        for _ in range(args.repeats):
            for i, P in enumerate(args.lengths):
                t = time.perf_counter()
                step(P, size)
                res["step_s"][label][i].append(time.perf_counter() - t)
    for P in args.lengths:
        if new:
            dec.reset(P)
            before = dec.arena.copied
            dec.decode_one_token(probe)
            res["copied_bytes"].append(dec.arena.copied - before)
        else:
            res["copied_bytes"].append(old_written(P, row, groups))
    res["repack_bytes_per_token"] = amortised_repack_bytes(dec) if new else 0
    res["groups"] = groups
    return res


def old_written(P: int, row: int, groups: int) -> int:
    """Bytes the old graph wrote per step in cache-sized tensors: present = concat(past, new) (P+1 rows), and
    for grouped-query attention transformers' repeat_kv, an Expand of those rows to every query head
    (``groups`` copies; checked in the old ONNX graph: Expand [B, KVH, g, P+S, Hd] -> Reshape [B, H, P+S, Hd])."""
    return (P + 1) * row * (1 + (groups if groups > 1 else 0))


def _old_tree(ref: str, into: Path) -> Path:
    """``ref``'s export/runtime/descriptors as a ``safeclip`` namespace package under ``into``."""
    src = into / "src"
    src.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "export", "runtime", "descriptors"],
                         check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    pkg = into / "safeclip"
    pkg.mkdir()
    for name in ("export", "runtime", "descriptors"):
        (src / name).rename(pkg / name)
    return into


def _run_worker(tree: Path | None, out: Path, args) -> dict:
    boot = ("import sys, json; tree = sys.argv[1]\n"
            "if tree:\n"
            "    sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()\n"
            "                        and 'editable' not in getattr(f, '__name__', '').lower()]\n"
            "    sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
            "    sys.path_importer_cache.clear(); sys.path.insert(0, tree)\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import kv_costs, safeclip.runtime\n"
            "assert (not tree) or safeclip.runtime.__path__[0].startswith(tree), safeclip.runtime.__path__\n"
            "print('RESULT' + json.dumps(kv_costs.worker(kv_costs._parser().parse_args(sys.argv[2:]))))\n")
    argv = ["--model", args.model, "--layers", str(args.layers), "--capacity", str(args.capacity),
            "--repeats", str(args.repeats), "--out", str(out), "--lengths", *map(str, args.lengths)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", boot, str(tree or ""), *argv], capture_output=True, text=True, env=env)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"worker ({tree or 'this tree'}) failed:\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT"):])


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["demo", "tinyllama"], default="demo")
    ap.add_argument("--layers", type=int, default=4, help="tinyllama: how many of the 22 layers")
    ap.add_argument("--capacity", type=int, default=2048)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 256, 1024, 2000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="old/new alternations (their samples pooled)")
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap


def _table(old: dict, new: dict) -> str:
    mb = 1e6

    def ms(samples):
        return f"{np.median(samples) * 1e3:.2f} ({min(samples) * 1e3:.2f}) ms"

    lines = ["| past P | old: written/step (Concat + repeat_kv) | old: step | new: copied/step | new: step, bucket P+1 | "
             "new: step, bucket 2P | alternative: whole capacity bound |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, P in enumerate(new["lengths"]):
        lines.append(f"| {P} | {old['copied_bytes'][i] / mb:.3f} MB | {ms(old['step_s']['-'][i])} | "
                     f"{new['copied_bytes'][i] / 1e3:.1f} kB | {ms(new['step_s']['P+1'][i])} | "
                     f"{ms(new['step_s']['2P'][i])} | {ms(new['step_s']['C'][i])} |")
    lines.append(f"\nGQA groups (query heads per KV head): {new['groups']}. KV memory: old {old['kv_memory_bytes'] / mb:.1f} MB (two arenas), new "
                 f"{new['kv_memory_bytes'] / mb:.1f} MB (one arena); new repacks: "
                 f"{new['repack_bytes_per_token'] / 1e3:.1f} kB per token amortised over a generation to the capacity.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kvcosts-"))
    old_tree = _old_tree(args.old_ref, work / "old")
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, tree in (("old", old_tree), ("new", None)):
            res = _run_worker(tree, work / f"bundle-{name}", args)
            if name in best:                                         # pool the samples of every round
                for k, v in res["step_s"].items():
                    best[name]["step_s"][k] = [a + b for a, b in zip(best[name]["step_s"][k], v)]
            else:
                best[name] = res
            print(f"round {r + 1}: {name} done", file=sys.stderr)
    print(f"{args.model}" + (f" ({args.layers} layers)" if args.model == "tinyllama" else "") +
          f", capacity {args.capacity}, fp32; step times: median (best) of {args.repeats} x {args.rounds} "
          f"alternated rounds; load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(_table(best["old"], best["new"]))
    if args.json:
        args.json.write_text(json.dumps(best, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
