"""Weight-only int8 / int4 decoders vs fp32 on the CPU (ONNX Runtime): decode speed, roofline, size, error.

One run on one machine:

* Model: the language model of ``scripts/bench_generate.py`` (``--shape tinyllama-1.1b``: hidden 2048,
  22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000; random weights from its seed, a tiny CLIP tower the
  text-only prompt never runs), saved once as an fp16 safetensors LLaVA checkpoint in ``--work``.
* Three decoders exported from that checkpoint by the streaming exporter (``export_decoder`` on a meta-device
  skeleton, weights read tensor by tensor), each in its own subprocess: ``fp32``, ``int8`` and ``int4``
  (``--block-size``, symmetric, round to nearest, ``lm_head`` kept fp32 in both: int8's default quantises it,
  ``scripts/bench_peers.py`` measures that). Each export
  passes its parity gate (the int8/int4 gate: ``export/quant_parity.py``) or the run stops. Peak RSS of each
  export is the subprocess' ``VmHWM``; "bundle" is its decoder graph + data + embedding table.
* Decode tokens/s: the three runtimes (``OrtDecoder`` as ``runtime/pipeline.py`` loads it) loaded together,
  greedy ``generate`` of ``--new-tokens`` from the same random prompt, **alternated** fp32, int8, int4 for
  ``--repeats`` rounds after a warm-up; medians; ratios are of medians from this one run.
* Exports are made with the cpu target's graph form (``ort_fusions``: RMSNorm fused) and reused while the
  exporter's sources (``export/``, hashed into ``bundle.json``) are unchanged; ``--rebuild`` forces them.
* Roofline: a decode step reads every decoder initializer once (``weight_bytes_per_token``: packed weights,
  scales and the fp32 ``lm_head``); bound = the machine's read bandwidth (numpy dot over 256 MiB, 2 threads)
  / those bytes. The bandwidth is probed just before and just after every decode round: the fraction is given
  against the best probe of the whole run (the machine's peak, the STREAM convention) and, per round,
  against the mean of its two probes (the bandwidth the machine gave at that moment: on a shared VM the read
  bandwidth here jumps between ~33 and ~55 GB/s from one second to the next), median over rounds.
* Kernel roof: the decoder's weight operators alone (``weights_only_graph``: every MatMulNBits / weight MatMul
  fed a constant input, nothing else), timed in the same rounds: the fastest ONNX Runtime's kernels read these
  weights on this machine. Its share of a decode step says how much of the step the rest of the graph costs.
* Memory: peak RSS of the export (its subprocess' ``VmHWM``) and of the runtime (a fresh process that loads
  the bundle as below and decodes ``--new-tokens``), each over the bundle's bytes.
* Error: logits of the int8/int4 graphs vs the fp32 graph on the same prompt (prefill, last position), next to
  the weights' own reconstruction error and the export-time error vs the unquantised PyTorch model.

    python scripts/bench_quant.py                   # ~30 min on 2 shared cores, ~8 GB RAM, ~10 GB disk
    python scripts/bench_quant.py --quick           # tiny shape, ~2 minutes

JSON goes to ``--out`` (default ``bench-results/bench_quant.json``), a Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (SEED, SHAPES, Bandwidth, build_llava, machine_facts, make_tokenizer,  # noqa: E402
                            proc_status_bytes, weight_bytes_per_token)

VARIANTS = ("fp32", "int8", "int4")
TARGETS = {"int4": 2.5, "int8": 1.6}           # decode tokens/s over fp32 (issue 13 section 3)
ROOFLINE_TARGET = 0.60


def write_checkpoint(ckpt: Path, shape_name: str) -> None:
    """The random-weight LLaVA of bench_generate, fp16 safetensors + tokenizer + config (a subprocess)."""
    import torch

    model = build_llava(SHAPES[shape_name]).to(torch.float16)
    model.save_pretrained(ckpt, safe_serialization=True)
    make_tokenizer(SHAPES[shape_name]["vocab_size"]).save(str(ckpt / "tokenizer.json"))
    (ckpt / "stamp.json").write_text(json.dumps({"shape": SHAPES[shape_name], "seed": SEED}))


def export_one(ckpt: Path, out: Path, weights: str, block_size: int, form: str = "fused",
               lm_head: bool = False, lm_head_bits: int | None = None) -> None:
    """Streaming export of the decoder in ``weights`` (run as a subprocess; writes ``out/bundle.json``).
    ``form``: ``fused`` (the cpu target's graph of ONNX Runtime's fused operators) or ``traced`` (the traced
    graph with RMSNorm fused, the cpu target's form before issue 26; ``scripts/bench_fused.py`` compares them);
    ``lm_head``: quantise it too (``--quantize-lm-head``), with ``lm_head_bits`` bits (``--lm-head-bits``; None:
    the body's)."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from safeclip.export.decoder import export_decoder
    from safeclip.export.quant import scheme_for
    from safeclip.export.targets import target
    from safeclip.export.weights import CheckpointWeights, SafetensorsCheckpoint, checkpoint_key_map, meta_model
    from tokenizers import Tokenizer
    from transformers import AutoConfig

    out.mkdir(parents=True, exist_ok=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(ckpt / "tokenizer.json")),
                                     bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    hf_tok.save_pretrained(out)
    t0 = time.perf_counter()
    skeleton = meta_model(LlavaForConditionalGeneration, AutoConfig.from_pretrained(ckpt))
    st = SafetensorsCheckpoint(ckpt)
    reader = CheckpointWeights(st, checkpoint_key_map(skeleton, st, str(ckpt)))
    quant = scheme_for(None if weights == "fp32" else weights, target("cpu"),
                       None if weights == "fp32" else block_size, lm_head=lm_head or bool(lm_head_bits),
                       lm_head_bits=lm_head_bits)
    frag = export_decoder(skeleton, out, dtype="float32", tokenizer=hf_tok, weights=reader, quant=quant,
                          ort_fusions=True, fused=form == "fused")   # as the cpu target's bundle is exported
    files = [out / f for f in (frag["graphs"]["decoder"]["file"], frag["graphs"]["decoder"]["data"],
                               frag["embeddings"]["file"]) if f]
    info = {"weights": weights, "form": form, "exporter": exporter_digest(), "graphs": frag["graphs"],
            "embeddings": frag["embeddings"], "model": frag["model"],
            "export_s": time.perf_counter() - t0, "export_peak_rss_bytes": proc_status_bytes("VmHWM"),
            "bundle_bytes": sum(f.stat().st_size for f in files),
            "decoder_bytes": sum(f.stat().st_size for f in files[:-1]),
            "parity": [{"component": r.component, "max_abs_err": r.max_abs_err,
                        "atol": {k: (v if v != float("inf") else None) for k, v in r.atol.items()}}
                       for r in frag["parity"]]}
    (out / "bundle.json").write_text(json.dumps(info, indent=1))


def exporter_digest() -> str:
    """sha256 of the exporter's sources (``export/``): an export made by other code is not reused."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "export"
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")) + sorted(root.glob("*.json")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _child(*args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], check=True)


def ensure(work: Path, shape_name: str, block_size: int, rebuild: bool) -> dict:
    ckpt = work / f"ckpt-{shape_name}"
    stamp = {"shape": SHAPES[shape_name], "seed": SEED}
    if rebuild or not (ckpt / "stamp.json").exists() or json.loads((ckpt / "stamp.json").read_text()) != stamp:
        _child("--_checkpoint", str(ckpt), "--shape", shape_name)
    infos = {}
    digest = exporter_digest()
    for w in VARIANTS:
        out = work / (f"{shape_name}-{w}" + ("" if w == "fp32" else f"-b{block_size}"))
        meta = out / "bundle.json"
        if rebuild or not meta.exists() or json.loads(meta.read_text()).get("exporter") != digest:
            meta.unlink(missing_ok=True)
            _child("--_export", str(out), "--ckpt", str(ckpt), "--weights", w, "--block-size", str(block_size))
        infos[w] = {**json.loads(meta.read_text()), "dir": str(out)}
    return infos


def weights_only_graph(onnx_path: Path) -> Path:
    """A graph of only the decoder's weight operators: every ``MatMulNBits`` and every ``MatMul`` whose weight is
    an initializer (``lm_head`` included), each fed a graph input of its K, with the decoder's own initializers
    (still pointing at its data file). One run reads every weight byte once, as a decode step does, and does
    nothing else: the fastest these kernels get through these weights on this machine (the "kernel roof").
    Written next to the decoder as ``.weights_only.onnx`` (ONNX Runtime resolves external data from the model's
    folder); the caller deletes it."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    ks: dict[str, int] = {}
    nodes, used = [], []
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            k = next(a.i for a in n.attribute if a.name == "K")
        elif n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            k = int(inits[n.input[1]].dims[0])
        else:
            continue
        ks.setdefault(f"x{k}", k)
        node = onnx.NodeProto()
        node.CopyFrom(n)
        node.input[0] = f"x{k}"
        del node.output[:]
        node.output.append(f"y{len(nodes)}")
        nodes.append(node)
        used += [i for i in n.input[1:] if i]
    g = helper.make_graph(nodes, "weights_only",
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, k]) for x, k in ks.items()],
                          [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
                          [inits[i] for i in dict.fromkeys(used)])
    path = onnx_path.with_name(".weights_only.onnx")
    onnx.save(helper.make_model(g, opset_imports=m.opset_import, ir_version=m.ir_version), str(path))
    return path


class WeightsOnly:
    """Times :func:`weights_only_graph` for one bundle (the runtime's session options)."""

    def __init__(self, onnx_path: Path, threads: int):
        import onnxruntime as ort

        from safeclip.runtime.backends.ort import make_options

        path = weights_only_graph(onnx_path)
        try:
            self.sess = ort.InferenceSession(str(path), make_options(threads), providers=["CPUExecutionProvider"])
        finally:
            path.unlink()
        rng = np.random.default_rng(SEED)
        self.feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in self.sess.get_inputs()}
        self.nodes = len(self.sess.get_outputs())
        for _ in range(2):
            self.sess.run(None, self.feeds)

    def seconds(self, runs: int = 5) -> float:
        """Median wall time of ``runs`` runs."""
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.sess.run(None, self.feeds)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def runtime_rss(folder: Path, threads: int, prompt_len: int, new_tokens: int) -> None:
    """(child process) Load one bundle as the benchmark does, decode, print the process' peak and final RSS."""
    info = {**json.loads((folder / "bundle.json").read_text()), "dir": str(folder)}
    rt = Runtime(folder, info, threads, prompt_len + new_tokens + 8)
    loaded = proc_status_bytes("VmHWM")
    ids = np.random.default_rng(SEED).integers(5, info["model"]["vocab_size"], size=prompt_len)
    rt.decode_tps(ids, new_tokens)
    print(json.dumps({"peak_rss_bytes": proc_status_bytes("VmHWM"), "peak_after_load_bytes": loaded,
                      "rss_bytes": proc_status_bytes("VmRSS")}))


class Runtime:
    def __init__(self, folder: Path, info: dict, threads: int, capacity: int):
        from safeclip.runtime.backends.ort import make_options

        so = make_options(threads)                  # the runtime's own options (SAFECLIP_SPIN honoured)
        ctx = int(info["model"]["context_length"])
        self.decoder = decoder_class(info).from_manifest(folder, info["graphs"]["decoder"], capacity=min(capacity, ctx),
                                                context_length=ctx, session_options=so)
        self.table = np.load(folder / info["embeddings"]["file"], mmap_mode="r", allow_pickle=False)
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from safeclip.runtime.generate import embed_prompt

        self.decoder.reset()
        return np.asarray(self.decoder.prefill(embed_prompt(self.table, ids, dtype=self.decoder.dtype)),
                          np.float64).reshape(-1)

    def decode_tps(self, ids: np.ndarray, n: int) -> float:
        from safeclip.runtime.generate import embed_prompt, generate

        stamps: list[float] = []
        emb = embed_prompt(self.table, ids, dtype=self.decoder.dtype)
        generate(self.decoder, self.table, emb, max_new_tokens=n, eos_token_ids=[], tokenizer=self.tok,
                 on_token=lambda t, piece: stamps.append(time.perf_counter()))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decoder_class(info: dict):
    """The runtime's decoder for a bundle's KV form (``pick.open_decoder`` chooses the same way)."""
    from safeclip.runtime.backends.ort import OrtDecoder
    from safeclip.runtime.backends.ort_shared import SharedKVDecoder

    return SharedKVDecoder if info["graphs"]["decoder"]["kv"].get("form") == "shared" else OrtDecoder


def _child_json(*args: str) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    infos = ensure(args.work, args.shape, args.block_size, args.rebuild)
    rss = {w: _child_json("--_rss", i["dir"], "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
                          "--new-tokens", str(args.new_tokens)) for w, i in infos.items()}   # one process each
    bw = Bandwidth(args.threads)
    rts = {w: Runtime(Path(i["dir"]), i, args.threads, args.prompt_len + args.new_tokens + 8)
           for w, i in infos.items()}
    kernels = {w: WeightsOnly(Path(i["dir"]) / i["graphs"]["decoder"]["file"], args.threads)
               for w, i in infos.items()}
    rng = np.random.default_rng(SEED)
    ids = rng.integers(5, SHAPES[args.shape]["vocab_size"], size=args.prompt_len)
    ref = rts["fp32"].logits(ids)
    errors = {}
    for w in VARIANTS[1:]:
        got = rts[w].logits(ids)
        errors[w] = {"logits_max_abs": float(np.abs(got - ref).max()),
                     "logits_max_rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
                     "top1_agree": bool(got.argmax() == ref.argmax())}
    for rt in rts.values():                                         # warm-up
        rt.decode_tps(ids, 4)
    tps = {w: [] for w in VARIANTS}
    kern = {w: [] for w in VARIANTS}
    paired = {w: [] for w in VARIANTS}                               # read GB/s just before and after each decode
    bands = []
    for _ in range(args.repeats):
        for w in VARIANTS:                                          # alternated within each round
            before = bw.measure()
            tps[w].append(rts[w].decode_tps(ids, args.new_tokens))
            kern[w].append(kernels[w].seconds())
            after = bw.measure()
            bands += [before, after]
            paired[w].append((before["read_GBps"] + after["read_GBps"]) / 2 * 1e9)
    read_bw = max(b["read_GBps"] for b in bands) * 1e9
    copy_bw = max(b["copy_GBps"] for b in bands) * 1e9
    res = {"machine": machine_facts(), "shape": {"name": args.shape, **SHAPES[args.shape]}, "seed": SEED,
           "block_size": args.block_size, "threads": args.threads, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "repeats": args.repeats,
           "bandwidth": {"read_GBps": read_bw / 1e9, "copy_GBps": copy_bw / 1e9,
                         "read_GBps_median": statistics.median(b["read_GBps"] for b in bands), "samples": bands},
           "variants": {}}
    med0 = statistics.median(tps["fp32"])
    for w in VARIANTS:
        info, folder = infos[w], Path(infos[w]["dir"])
        per_token = weight_bytes_per_token(folder / info["graphs"]["decoder"]["file"])
        med = statistics.median(tps[w])
        q = info["graphs"]["decoder"].get("quantization") or {}
        k_med = statistics.median(kern[w])
        res["variants"][w] = {
            "decode_tps": tps[w], "decode_tps_median": med, "speedup_vs_fp32": med / med0,
            "bytes_per_token": per_token, "roofline_tps": read_bw / per_token,
            "roofline_fraction": med / (read_bw / per_token),
            "paired_read_Bps": paired[w],
            "roofline_fraction_paired": [t * per_token / b for t, b in zip(tps[w], paired[w])],
            "roofline_fraction_paired_median": statistics.median(t * per_token / b for t, b in zip(tps[w], paired[w])),
            "weights_only_s": kern[w], "weights_only_s_median": k_med, "weights_only_nodes": kernels[w].nodes,
            "weights_only_GBps": per_token / k_med / 1e9, "weights_only_share_of_step": k_med * med,
            "fusions": info["graphs"]["decoder"].get("fusions"),
            "decoder_bytes": info["decoder_bytes"], "bundle_bytes": info["bundle_bytes"],
            "export_peak_rss_bytes": info["export_peak_rss_bytes"],
            "export_rss_over_bundle": info["export_peak_rss_bytes"] / info["bundle_bytes"],
            "runtime_peak_rss_bytes": rss[w]["peak_rss_bytes"], "runtime_rss_after_decode_bytes": rss[w]["rss_bytes"],
            "runtime_rss_over_bundle": rss[w]["peak_rss_bytes"] / info["bundle_bytes"],
            "export_s": info["export_s"], "parity": info["parity"],
            "logits_vs_fp32_graph": errors.get(w), "weights_reconstruction": (q.get("error") or {}).get("weights"),
            "export_vs_unquantised": (q.get("error") or {}).get("vs_unquantised"),
            "scheme": {k: v for k, v in q.items() if k != "error"}}
    return res


def markdown(r: dict) -> str:
    v = r["variants"]
    rows = ["| | fp32 | int8 | int4 |", "|---|---:|---:|---:|"]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(w, v[w]) for w in VARIANTS) + " |")

    row("decode tokens/s (median)", lambda w, x: f"{x['decode_tps_median']:.2f}")
    row("speed-up vs fp32 (target)", lambda w, x: f"{x['speedup_vs_fp32']:.2f}x" +
        (f" (≥ {TARGETS[w]}x: {'met' if x['speedup_vs_fp32'] >= TARGETS[w] else 'missed'})" if w in TARGETS else ""))
    row("bytes read per token (GB)", lambda w, x: f"{x['bytes_per_token'] / 1e9:.3f}")
    row("roofline tokens/s / fraction (best probe of the run)",
        lambda w, x: f"{x['roofline_tps']:.1f} / {100 * x['roofline_fraction']:.0f}%")
    row("fraction vs the probes around each round (median; min-max)", lambda w, x:
        f"{100 * x['roofline_fraction_paired_median']:.0f}% ({100 * min(x['roofline_fraction_paired']):.0f}-"
        f"{100 * max(x['roofline_fraction_paired']):.0f}%)")
    row("weights-only graph: ms per pass / GB/s (kernel roof)", lambda w, x:
        f"{1e3 * x['weights_only_s_median']:.1f} / {x['weights_only_GBps']:.1f}")
    row("share of a decode step in the weight kernels", lambda w, x: f"{100 * x['weights_only_share_of_step']:.0f}%")
    row("decoder on disk (GB)", lambda w, x: f"{x['decoder_bytes'] / 1e9:.3f}")
    row("bundle (decoder + embeddings, GB)", lambda w, x: f"{x['bundle_bytes'] / 1e9:.3f}")
    row("export peak RSS (GB; x bundle)", lambda w, x: f"{x['export_peak_rss_bytes'] / 1e9:.2f} "
        f"({x['export_rss_over_bundle']:.2f}x)")
    row("runtime peak RSS (GB; x bundle)", lambda w, x: f"{x['runtime_peak_rss_bytes'] / 1e9:.2f} "
        f"({x['runtime_rss_over_bundle']:.2f}x)")
    row("logits vs fp32 graph: max abs / rel", lambda w, x: "-" if not x["logits_vs_fp32_graph"] else
        f"{x['logits_vs_fp32_graph']['logits_max_abs']:.3g} / {x['logits_vs_fp32_graph']['logits_max_rel']:.2%}")
    row("weights rel. reconstruction error (mean)", lambda w, x: "-" if not x["weights_reconstruction"] else
        f"{x['weights_reconstruction']['rel_frobenius_mean']:.2%}")
    b = r["bandwidth"]
    return ("\n".join(rows) + f"\n\n{r['shape']['name']} shape, random weights (seed {r['seed']}), CPU ONNX Runtime, "
            f"{r['threads']} threads, block {r['block_size']}, prompt {r['prompt_len']} tokens, {r['new_tokens']} new, "
            f"{r['repeats']} alternated rounds. Read bandwidth: best {b['read_GBps']:.1f} GB/s, median "
            f"{b['read_GBps_median']:.1f} of {len(b['samples'])} probes (copy best {b['copy_GBps']:.1f}). "
            f"int4 roofline target ≥ {ROOFLINE_TARGET:.0%}: against the best probe "
            f"{'met' if v['int4']['roofline_fraction'] >= ROOFLINE_TARGET else 'missed'}, against the probes around "
            f"each round {'met' if v['int4']['roofline_fraction_paired_median'] >= ROOFLINE_TARGET else 'missed'}.\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="the tiny shape, fewer tokens")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SAFECLIP_BENCH_WORK", "/work/bench_ckpt"))
                    / "quant")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_quant.json"))
    ap.add_argument("--_checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_export", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_rss", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--form", choices=["fused", "traced"], default="fused", help=argparse.SUPPRESS)
    ap.add_argument("--lm-head", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lm-head-bits", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.new_tokens, args.repeats, args.block_size = "quick", 16, 3, 64
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._checkpoint:
        write_checkpoint(args._checkpoint, args.shape)
        return 0
    if args._export:
        export_one(args.ckpt, args._export, args.weights, args.block_size, args.form, args.lm_head,
                   args.lm_head_bits)
        return 0
    if args._rss:
        runtime_rss(args._rss, args.threads, args.prompt_len, args.new_tokens)
        return 0
    res = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
