"""Decode tokens/s, time to first token and peak memory: our runtime's decoder vs transformers' ``generate``.

One run on one machine, same random-weight model on both sides:

* The model is a ``LlavaForConditionalGeneration`` whose language model has real small-LLM dimensions
  (``--shape tinyllama-1.1b``: hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000; a tiny
  CLIP tower that the text-only prompt never runs), built from a seed; fp32. It is exported once with
  ``safeclip.export.decoder.export_decoder`` in a subprocess (cached in ``--work-dir``) and rebuilt from the
  same seed for transformers; the first generation of both sides must give the same greedy tokens, which
  proves the weights (and the work) are the same.
* A/B alternated in one process after a warm-up: the runtime (``OrtDecoder`` loaded as
  ``runtime/pipeline.py`` does, ``generate`` with detokenization) and ``model.generate`` (greedy, EOS
  disabled, default attention), the same random prompt of ``--prompt-len`` token ids and
  ``--new-tokens`` new tokens. Medians of ``--repeats`` pairs. torch and ORT intra-op threads = ``--threads``.
  TTFT = call to first new token; decode tokens/s = (new tokens - 1) / (last token - first token).
* Roofline: a decode step reads every decoder weight once (all layers and lm_head; not the embedding
  table, of which it reads one row; KV reads are a few MB at these lengths). Bound = bandwidth / weight
  bytes. Bandwidths are measured after each A/B pair with numpy on 256 MiB arrays, ``--threads`` threads,
  and the best of the run is the machine's: ``copy`` counts bytes read + written per second (the STREAM
  convention), ``read`` is a float32 dot of two arrays (bytes read per second).
* Peak RSS: a subprocess that only imports the runtime, loads the decoder with a KV cache of
  ``--capacity`` positions and the memory-mapped embedding table, and generates; ``VmHWM`` relative to the
  weight bytes (``decoder.onnx.data`` + embedding table). The KV arena (one, ``runtime/backends/arena.py``) is reported separately: ``np.zeros``
  pages become resident only when written, so VmHWM holds just the positions used; VmHWM + the whole arena
  bounds a full cache. Variants of ONNX Runtime session options run the same way.

    python scripts/bench_generate.py                # full run, ~10 minutes on 2 cores
    python scripts/bench_generate.py --quick        # tiny shapes, < 1 minute

JSON goes to ``--out`` (default ``bench-results/bench_generate.json``), a Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SHAPES = {  # LlamaConfig fields of the language model
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    "quick": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=704, vocab_size=8000, max_position_embeddings=2048),
    # quick at the Llama-2 vocabulary's size: scripts/bench_peers.py --quick (the peers' converters need a real vocab)
    "quick-32k": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=704, vocab_size=32000, max_position_embeddings=2048),
}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]     # ids 0..4; prompts use ids >= 5
SEED = 20250302
# ONNX Runtime session variants for the memory subprocess: (name, session config entries, enable_cpu_mem_arena)
RSS_VARIANTS = {
    "default": ({}, True),
    "disable_prepacking": ({"session.disable_prepacking": "1"}, True),
    "no_cpu_arena": ({}, False),
}


# -- process and machine facts ------------------------------------------------------------------------------
def _proc_field(path: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                if line.startswith(key))


def proc_status_bytes(key: str) -> int:
    """``VmHWM`` / ``VmRSS`` ... of this process from /proc/self/status, in bytes."""
    return int(_proc_field("/proc/self/status", key + ":").split()[0]) * 1024


def machine_facts() -> dict:
    import onnxruntime

    return {"cpu": _proc_field("/proc/cpuinfo", "model name"), "cores": os.cpu_count(),
            "mem_total_bytes": int(_proc_field("/proc/meminfo", "MemTotal:").split()[0]) * 1024,
            "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _best(fn, repeats: int) -> float:
    from kv_costs import best_of                         # the timer kv_update_costs uses (scripts/kv_costs.py)
    return best_of(fn, repeats)


class Bandwidth:
    """Host memory bandwidth, ``threads`` threads (numpy releases the GIL), arrays far larger than the caches."""

    def __init__(self, threads: int, nbytes: int = 256 << 20):
        self.threads, self.src = threads, np.ones(nbytes // 4, np.float32)
        self.dst, self.other = np.empty_like(self.src), np.ones_like(self.src)

    def _threaded(self, fn, *arrays) -> None:
        k = self.src.size // self.threads
        ts = [threading.Thread(target=fn, args=tuple(a[i * k:(i + 1) * k] for a in arrays))
              for i in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def measure(self, repeats: int = 3) -> dict:
        """GB/s: ``copy`` = bytes read + written per s (STREAM), ``read`` = bytes read per s (dot); best of repeats."""
        n = self.src.nbytes
        t_copy = _best(lambda: self._threaded(np.copyto, self.dst, self.src), repeats)
        t_read = _best(lambda: self._threaded(np.dot, self.src, self.other), repeats)
        return {"copy_GBps": 2 * n / t_copy / 1e9, "read_GBps": 2 * n / t_read / 1e9}


# -- the model -----------------------------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("the transformers side needs torch: pip install 'safeclip-edge[export]'") from e
    return torch


def make_tokenizer(vocab_size: int):
    """Byte-level BPE tokenizer whose vocabulary is exactly the model's: specials, 256 bytes, then ``<tN>``.

    The filler tokens are ordinary (not special) vocabulary entries, so detokenizing random-weight output
    costs what it costs on real text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for i in range(vocab_size - len(vocab)):
        vocab[f"<t{i}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def build_llava(shape: dict, seed: int = SEED):
    """Random-weight LLaVA (fp32, eval) with the given Llama language model and a tiny CLIP tower; deterministic."""
    torch = _torch()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=SPECIALS.index("<image>"),
                      image_seq_length=4, vision_feature_layer=-2, pad_token_id=3)
    return LlavaForConditionalGeneration(cfg).eval()


def export_bundle(work: Path, shape_name: str, dtype: str = "float32") -> dict:
    """Build, export (``export_decoder``) and describe the decoder in ``work``; run as a subprocess."""
    from transformers import PreTrainedTokenizerFast

    from safeclip.export.decoder import export_decoder

    work.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(SHAPES[shape_name]["vocab_size"])
    tok.save(str(work / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>")
    t0 = time.perf_counter()
    model = build_llava(SHAPES[shape_name])
    t1 = time.perf_counter()
    frag = export_decoder(model, work, dtype=dtype, tokenizer=hf_tok)
    t2 = time.perf_counter()
    info = {"shape_name": shape_name, "shape": SHAPES[shape_name], "seed": SEED, "dtype": dtype,
            "graphs": frag["graphs"], "embeddings": frag["embeddings"], "model": frag["model"],
            "build_s": t1 - t0, "export_s": t2 - t1, "export_peak_rss_bytes": proc_status_bytes("VmHWM"),
            "parity_logits": {r.component: {"max_abs_err": r.max_abs_err["logits"], "atol": r.atol["logits"]}
                              for r in frag["parity"]}}
    (work / "bundle.json").write_text(json.dumps(info, indent=1))
    return info


def cached_bundle(work: Path, shape_name: str, dtype: str, rebuild: bool) -> dict:
    """The exported bundle in ``work`` if it matches the shape, seed and dtype; else export it in a subprocess."""
    meta = work / "bundle.json"
    if meta.exists() and not rebuild:
        info = json.loads(meta.read_text())
        files = [info["graphs"]["decoder"]["file"], info["graphs"]["decoder"]["data"], info["embeddings"]["file"]]
        if (info.get("shape") == SHAPES[shape_name] and info.get("seed") == SEED and info.get("dtype") == dtype
                and all((work / f).exists() for f in files if f)):
            return {**info, "cached": True}
    meta.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--_export", str(work), "--shape", shape_name, "--dtype", dtype],
                   check=True)
    return {**json.loads(meta.read_text()), "cached": False}


# -- the two sides -------------------------------------------------------------------------------------------
class Runtime:
    """The decoder as ``runtime/pipeline.py`` loads it: ``OrtDecoder.from_manifest``, mmapped embedding table."""

    def __init__(self, work: Path, info: dict, threads: int, capacity: int, config: dict | None = None,
                 cpu_arena: bool = True):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from safeclip.runtime.backends.ort import OrtDecoder

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_cpu_mem_arena = cpu_arena
        for k, v in (config or {}).items():
            so.add_session_config_entry(k, v)
        ctx = int(info["model"]["context_length"])
        self.decoder = OrtDecoder.from_manifest(work, info["graphs"]["decoder"], capacity=min(capacity, ctx),
                                                context_length=ctx, session_options=so)
        self.table = np.load(work / info["embeddings"]["file"], mmap_mode="r", allow_pickle=False)   # [V, D]
        self.tok = Tokenizer.from_file(str(work / "tokenizer.json"))

    @property
    def kv_arena_bytes(self) -> int:
        """The one KV arena: 2L x KVH*C*Hd elements (``runtime/backends/arena.py``)."""
        return self.decoder.kv_bytes

    def run(self, ids: np.ndarray, n: int) -> dict:
        from safeclip.runtime.generate import embed_prompt, generate

        stamps: list[float] = []
        t0 = time.perf_counter()
        emb = embed_prompt(self.table, ids, dtype=self.decoder.dtype)                 # [S, D]
        res = generate(self.decoder, self.table, emb, max_new_tokens=n, eos_token_ids=[], tokenizer=self.tok,
                       on_token=lambda t, piece: stamps.append(time.perf_counter()))
        return _sample(t0, stamps, res.token_ids, n)


def _sample(t0: float, stamps: list[float], tokens: list[int], n: int) -> dict:
    if len(tokens) != n or len(stamps) != n:
        raise RuntimeError(f"expected {n} new tokens, got {len(tokens)} ({len(stamps)} timestamps)")
    return {"ttft_s": stamps[0] - t0, "decode_tokens_per_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0,
            "total_s": stamps[-1] - t0, "tokens": [int(t) for t in tokens]}


def hf_run(model, ids: np.ndarray, n: int) -> dict:
    """``model.generate``: greedy, EOS disabled, timestamps from a streamer (first put is the prompt)."""
    torch = _torch()
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.calls: list[float] = []

        def put(self, value):
            self.calls.append(time.perf_counter())

        def end(self):
            pass

    s = Stamps()
    x = torch.from_numpy(np.asarray(ids, np.int64))[None]                              # [1, S]
    t0 = time.perf_counter()
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=3, streamer=s)
    return _sample(t0, s.calls[1:], out[0, x.shape[1]:].tolist(), n)


def weight_bytes_per_token(onnx_path: Path) -> int:
    """Bytes of the decoder graph's initializers (external data lengths + inline tensors)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.data_location != onnx.TensorProto.EXTERNAL:
            total += numpy_helper.to_array(t).nbytes
        else:
            raise ValueError(f"initializer {t.name} has external data without a length")
    return total


# -- peak memory subprocess ----------------------------------------------------------------------------------
def rss_child(work: Path, threads: int, capacity: int, prompt_len: int, n: int, variant: str) -> dict:
    """Load only the runtime's decoder (no torch) and generate; memory figures from /proc/self/status."""
    config, arena = RSS_VARIANTS[variant]
    import onnxruntime  # noqa: F401  (baseline: interpreter + numpy + ORT + tokenizers)
    import tokenizers  # noqa: F401

    import safeclip.runtime.generate  # noqa: F401

    info = json.loads((work / "bundle.json").read_text())
    base = proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    rt = Runtime(work, info, threads, capacity, config, arena)
    load_s = time.perf_counter() - t0
    after_load = {"vmhwm": proc_status_bytes("VmHWM"), "vmrss": proc_status_bytes("VmRSS")}
    ids = np.random.default_rng(0).integers(len(SPECIALS), rt.decoder.vocab_size, prompt_len)
    rt.run(ids, 2)                                                                   # warm-up
    r = rt.run(ids, n)
    return {"variant": variant, "session_config": config, "enable_cpu_mem_arena": arena,
            "torch_imported": "torch" in sys.modules, "baseline_rss_bytes": base, "load_s": load_s,
            "after_load_vmhwm_bytes": after_load["vmhwm"], "after_load_vmrss_bytes": after_load["vmrss"],
            "vmhwm_bytes": proc_status_bytes("VmHWM"), "vmrss_bytes": proc_status_bytes("VmRSS"),
            "kv_arena_bytes": rt.kv_arena_bytes, "capacity": rt.decoder.capacity,
            "decode_tokens_per_s": r["decode_tokens_per_s"], "ttft_s": r["ttft_s"], "new_tokens": n}


def rss_variant(work: Path, args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--_rss", str(work), "--variant", variant, "--threads", str(args.threads),
           "--capacity", str(args.capacity), "--prompt-len", str(args.prompt_len),
           "--rss-new-tokens", str(args.rss_new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------------------
def measure(args) -> dict:
    torch = _torch()
    import transformers

    from kv_costs import kv_update_costs          # scripts/kv_costs.py, beside this script

    load_start, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc)
    work = args.work_dir / f"{args.shape}-{args.dtype}"
    info = cached_bundle(work, args.shape, args.dtype, args.rebuild)
    torch.set_num_threads(args.threads)
    facts = {**machine_facts(), "torch": torch.__version__, "transformers": transformers.__version__,
             "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": args.threads}
    bw = Bandwidth(args.threads)
    bws = [bw.measure()]

    t0 = time.perf_counter()
    rt = Runtime(work, info, args.threads, args.capacity)
    t1 = time.perf_counter()
    model = build_llava(SHAPES[args.shape])
    rt_load_s, hf_build_s = t1 - t0, time.perf_counter() - t1
    ids = np.random.default_rng(1).integers(len(SPECIALS), SHAPES[args.shape]["vocab_size"], args.prompt_len)

    rt.run(ids, args.warmup_tokens)                                                   # warm-up, both sides
    hf_run(model, ids, args.warmup_tokens)
    runs: dict[str, list[dict]] = {"runtime": [], "transformers": []}
    loads = []
    for r in range(args.repeats):                                                     # A/B/A/B
        runs["runtime"].append(rt.run(ids, args.new_tokens))
        runs["transformers"].append(hf_run(model, ids, args.new_tokens))
        bws.append(bw.measure())
        loads.append(os.getloadavg()[0])
        print(f"pair {r + 1}/{args.repeats}: runtime {runs['runtime'][-1]['decode_tokens_per_s']:.2f} tok/s, "
              f"transformers {runs['transformers'][-1]['decode_tokens_per_s']:.2f} tok/s", file=sys.stderr)
    a, b = runs["runtime"][0]["tokens"], runs["transformers"][0]["tokens"]
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if agree == 0:
        raise RuntimeError("the runtime and transformers disagree on the first token: the weights differ "
                           f"(delete {work} to rebuild)")
    kv_lengths = sorted({0, min(args.prompt_len + args.new_tokens, rt.decoder.capacity - 1),
                         min(1024, rt.decoder.capacity - 1)})
    kv = kv_update_costs(rt.decoder, lengths=kv_lengths, repeats=3)
    kv_arena, attn = rt.kv_arena_bytes, model.config.get_text_config()._attn_implementation
    del model, rt, bw                                    # free both models before the memory subprocesses
    gc.collect()

    rss = [rss_variant(work, args, v) for v in args.rss_variants]
    graph = info["graphs"]["decoder"]
    data_bytes = (work / graph["data"]).stat().st_size if graph.get("data") else 0
    embed_bytes = (work / info["embeddings"]["file"]).stat().st_size
    wpt = weight_bytes_per_token(work / graph["file"])
    copy_bw, read_bw = max(b["copy_GBps"] for b in bws), max(b["read_GBps"] for b in bws)
    summary = {side: {**{k: statistics.median(r[k] for r in rs) for k in ("decode_tokens_per_s", "ttft_s")},
                      **{f"samples_{k}": [r[k] for r in rs] for k in ("decode_tokens_per_s", "ttft_s")}}
               for side, rs in runs.items()}
    tps = summary["runtime"]["decode_tokens_per_s"]
    pair_ratios = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                   for a, b in zip(runs["runtime"], runs["transformers"])]
    roof_copy, roof_read = copy_bw * 1e9 / wpt, read_bw * 1e9 / wpt
    weights_total = data_bytes + embed_bytes
    default_rss = next((r for r in rss if r["variant"] == "default"), rss[0] if rss else None)
    results = {
        "date": started.isoformat(timespec="seconds"), "command": " ".join(["python"] + sys.argv),
        "machine": facts, "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "model": {"shape_name": args.shape, **SHAPES[args.shape], "dtype": args.dtype, "seed": SEED,
                  "hf_attn_implementation": attn},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "export": {k: info.get(k) for k in ("cached", "build_s", "export_s", "export_peak_rss_bytes",
                                            "parity_logits")},
        "runtime_load_s": rt_load_s, "hf_build_s": hf_build_s,
        "runtime": summary["runtime"], "transformers": summary["transformers"],
        "decode_speedup": tps / summary["transformers"]["decode_tokens_per_s"],
        "decode_speedup_pairs": pair_ratios, "decode_speedup_pair_median": statistics.median(pair_ratios),
        "loadavg_1min_per_pair": loads,
        "ttft_speedup": summary["transformers"]["ttft_s"] / summary["runtime"]["ttft_s"],
        "greedy_tokens_agree": agree, "bandwidth_samples": bws,
        "copy_GBps": copy_bw, "read_GBps": read_bw,
        "weight_bytes_per_token": wpt, "decoder_data_bytes": data_bytes, "embed_table_bytes": embed_bytes,
        "roofline_copy_tokens_per_s": roof_copy, "roofline_copy_fraction": tps / roof_copy,
        "roofline_copy_fraction_best_run": max(summary["runtime"]["samples_decode_tokens_per_s"]) / roof_copy,
        "roofline_read_tokens_per_s": roof_read, "roofline_read_fraction": tps / roof_read,
        "kv_arena_bytes": kv_arena, "kv_update_costs": kv, "rss": rss,
        "peak_rss_over_weights": default_rss["vmhwm_bytes"] / weights_total if default_rss else None,
        "peak_rss_full_kv_over_weights": (default_rss["vmhwm_bytes"] + kv_arena) / weights_total
        if default_rss else None,
    }
    results["targets"] = {"decode_speedup>=1.5": results["decode_speedup"] >= 1.5,
                          "roofline_copy_fraction>=0.6": results["roofline_copy_fraction"] >= 0.6,
                          "peak_rss_over_weights<=1.3": None if default_rss is None
                          else results["peak_rss_over_weights"] <= 1.3}
    return results


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def markdown(r: dict) -> str:
    rt, hf, m, s = r["runtime"], r["transformers"], r["model"], r["settings"]
    weights = r["decoder_data_bytes"] + r["embed_table_bytes"]

    def spread(side: dict, key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        xs = [x * scale for x in side[f"samples_{key}"]]
        return f"{side[key] * scale:{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    lines = [
        f"Model: random-weight Llama decoder, {m['shape_name']} dims (hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, "
        f"MLP {m['intermediate_size']}, vocab {m['vocab_size']}), {m['dtype']}; prompt {s['prompt_len']} tokens, "
        f"{s['new_tokens']} new tokens, greedy (both sides gave the same {r['greedy_tokens_agree']} tokens); "
        f"median (min-max) of {s['repeats']} alternated pairs; torch threads {r['machine']['torch_threads']}, "
        f"ORT intra-op threads {r['machine']['ort_intra_op_threads']}.", "",
        "| | runtime (ONNX Runtime) | transformers `generate` | runtime / transformers |", "|---|---:|---:|---:|",
        f"| decode tokens/s | {spread(rt, 'decode_tokens_per_s')} | {spread(hf, 'decode_tokens_per_s')} | "
        f"{r['decode_speedup']:.2f}x (per-pair median {r['decode_speedup_pair_median']:.2f}x) |",
        f"| time to first token, ms | {spread(rt, 'ttft_s', 1e3, '.0f')} | {spread(hf, 'ttft_s', 1e3, '.0f')} | "
        f"{r['ttft_speedup']:.2f}x faster |", "",
        "| roofline | value |", "|---|---:|",
        f"| weight bytes read per decode token (all decoder weights incl. lm_head; not the embedding table) | "
        f"{_gb(r['weight_bytes_per_token'])} |",
        f"| copy bandwidth, {s['threads']} threads, bytes read + written per s (best of the run) | "
        f"{r['copy_GBps']:.1f} GB/s |",
        f"| read bandwidth, {s['threads']} threads, float32 dot (best of the run) | {r['read_GBps']:.1f} GB/s |",
        f"| bound at copy bandwidth | {r['roofline_copy_tokens_per_s']:.2f} tokens/s: runtime median at "
        f"{100 * r['roofline_copy_fraction']:.0f}%, best run at {100 * r['roofline_copy_fraction_best_run']:.0f}% |",
        f"| bound at read bandwidth | {r['roofline_read_tokens_per_s']:.2f} tokens/s: runtime median at "
        f"{100 * r['roofline_read_fraction']:.0f}% |", "",
        f"Peak memory of a runtime-only process (no torch; decoder, mmapped embedding table, KV capacity "
        f"{s['capacity']}, {s['rss_new_tokens']} tokens generated); weight bytes {_gb(weights)} = decoder.onnx.data "
        f"{_gb(r['decoder_data_bytes'])} + embedding table {_gb(r['embed_table_bytes'])}; the KV arena "
        f"({r['kv_arena_bytes'] / 1e6:.0f} MB) is resident only where written, so VmHWM counts the positions "
        f"used; with the whole cache written the default would be at most "
        f"{r['peak_rss_full_kv_over_weights']:.2f}x. One subprocess per ONNX Runtime session "
        "variant, run one after another (their tokens/s are not alternated).", "",
        "| ORT session variant | VmHWM | VmHWM / weight bytes | VmRSS after load | load | decode tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in r["rss"]:
        lines.append(f"| {v['variant']} | {_gb(v['vmhwm_bytes'])} | {v['vmhwm_bytes'] / weights:.2f}x | "
                     f"{_gb(v['after_load_vmrss_bytes'])} | {v['load_s']:.1f} s | {v['decode_tokens_per_s']:.2f} |")
    lines += ["", "Targets: " + ", ".join(f"{k}: {'met' if v else 'not met' if v is not None else 'n/a'}"
                                          for k, v in r["targets"].items()) + ".",
              f"Load average (1/5/15 min) start {', '.join(f'{x:.2f}' for x in r['loadavg_start'])}, end "
              f"{', '.join(f'{x:.2f}' for x in r['loadavg_end'])}; 1-min load after each pair "
              f"{', '.join(f'{x:.1f}' for x in r['loadavg_1min_per_pair'])}."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (development, < 1 minute)")
    p.add_argument("--dtype", choices=["float32"], default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and ORT intra-op threads")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=8, help="alternated runtime/transformers pairs")
    p.add_argument("--capacity", type=int, default=2048, help="KV cache capacity of the runtime decoder")
    p.add_argument("--rss-new-tokens", type=int, default=16)
    p.add_argument("--rss-variants", default=",".join(RSS_VARIANTS),
                   help=f"comma-separated ORT session variants for the memory subprocess ({', '.join(RSS_VARIANTS)})")
    p.add_argument("--work-dir", type=Path, default=Path("bench-results/bench_generate_work"))
    p.add_argument("--rebuild", action="store_true", help="export the decoder again even if cached")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_generate.json"))
    p.add_argument("--_export", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_rss", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.prompt_len, args.new_tokens, args.repeats, args.capacity = "quick", 32, 16, 3, 256
        args.rss_new_tokens = 8
    args.rss_variants = [v for v in args.rss_variants.split(",") if v]
    unknown = [v for v in args.rss_variants if v not in RSS_VARIANTS]
    if unknown:
        p.error(f"unknown --rss-variants {', '.join(unknown)} (supported: {', '.join(RSS_VARIANTS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._export:
        info = export_bundle(args._export, args.shape, args.dtype)
        print(f"exported {args._export} in {info['export_s']:.0f} s, peak RSS {_gb(info['export_peak_rss_bytes'])}",
              file=sys.stderr)
        return 0
    if args._rss:
        print(json.dumps(rss_child(args._rss, args.threads, args.capacity, args.prompt_len, args.rss_new_tokens,
                                   args.variant)))
        return 0
    results = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
