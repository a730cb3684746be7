"""Vision encoder + SafeCLIP gate benchmark at real LLaVA-1.5 shapes (random weights): one command.

    python scripts/bench.py             # CLIP ViT-L/14-336 + LLaVA-1.5-7B projector + gate: ~5 min idle, ~10 loaded
    python scripts/bench.py --quick     # tiny shapes, under a minute: checks the benchmark itself
    python scripts/bench.py --out DIR/bench.json --reps 7

Prints a Markdown table; writes JSON (default ``bench-results/bench.json``). Speed depends on shapes, not on
weight values, so the weights are random. Measured in one run:

* machine: CPU model, cores, copy bandwidth, and the fp32 GEMM peak (a 4096^3 matrix product in numpy,
  PyTorch and ONNX Runtime, probed in every timing round so it sees the same load as the graphs);
* gate overhead: the gate head alone (ONNX Runtime and numpy, on a CLS vector) over the vision+gate graph,
  and the vision+gate graph vs the same graph with the head removed (its ``class_probs`` output and the nodes
  only it needs deleted from the exported ONNX: every other node is identical);
* vision encoder: ONNX Runtime (the runtime's own ``make_session``) vs PyTorch eager (the exported module,
  eager attention as the exporter loads it, and with SDPA attention), the fraction of the GEMM peak, and
  ONNX Runtime variants: ``intra_op_num_threads=2``, intra-op thread spinning off, onnxscript's
  ``ort_fusions`` (Attention, SkipLayerNorm) and onnxruntime.transformers' ``optimize_model(model_type="clip")``;
* end to end on a clean image: ``Pipeline.generate(max_new_tokens=1)`` (preprocess + vision + prefill = time
  to first token) gated vs the same Pipeline on the ungated graph. The decoder has the real width but only
  ``lm_layers`` layers (memory: 2 cores, 24 GiB); the real 32-layer prefill is longer, so the gate's share
  measured here is an upper bound;
* exporter cost: wall time and peak RSS of ``export_vision_gate`` (export + parity) in a child process,
  per phase, as a multiple of the graph's weight bytes.

Timing: every variant runs once per round, rounds alternate the variants (the order rotates), the first
``--warmup`` rounds are discarded, and medians are reported; a difference between two variants is taken per
round (same load) and reported as the median and interquartile range of those. The with/without-gate pairs
get twice the rounds. Other processes share the 2 cores, so ``os.getloadavg()`` is recorded at start and end.
Never part of CI's test command (``tests/test_bench_quick.py`` runs ``--quick`` and is marked slow).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lib import (build_checkpoints, gate_head_module, head_numpy, machine_facts,  # noqa: E402
                       markdown_table, reset_peak_rss, rss_mb, strip_gate, trim, vision_flops, vision_sources)

SHAPES = {
    # CLIP ViT-L/14-336 tower, LLaVA-1.5-7B projector (1024 -> 4096 -> 4096), CLIP ViT-L/14 projection 1024 -> 768
    "full": dict(hidden=1024, inter=4096, layers=24, heads=16, image=336, patch=14, proj=768,
                 lm_hidden=4096, lm_inter=11008, lm_heads=32, lm_layers=1, context=4096, gemm=4096),
    "quick": dict(hidden=64, inter=128, layers=3, heads=4, image=112, patch=14, proj=32,
                  lm_hidden=64, lm_inter=128, lm_heads=4, lm_layers=1, context=512, gemm=512),
}
TARGETS = {"head_over_vision": 0.001, "graph_overhead": 0.001, "ort_over_eager": 1.35, "fraction_of_peak": 0.85,
           "ttft_overhead": 0.005, "export_rss_multiple": 1.5}
CHILD_TAG = "BENCH_CHILD_JSON "
PROMPT = "What is shown in this picture?"
IMAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "house.jpg"


# ---------------------------------------------------------------------------------------------------------
# child processes: their memory never mixes with the parent's
def child_export_cost(shape: dict, work: Path) -> dict:
    """Peak RSS and wall time of ``export_vision_gate`` (export + parity) on an in-memory model."""
    import torch

    import safeclip.export.bundle as bundle
    import safeclip.export.onnx as onnx_export
    import safeclip.export.parity as parity
    from safeclip.descriptors import load_descriptor_set

    dset = load_descriptor_set("default")
    src = vision_sources(shape, seed=0)
    te = torch.randn(len(dset.flat_sentences), shape["proj"], generator=torch.Generator().manual_seed(1))
    module = bundle.vision_gate_from_sources(src, dset, "reference", te)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    del module
    trim()
    phases, state = {}, {"name": "reference", "t": time.perf_counter()}

    def mark(next_name: str) -> None:                    # close the current phase: its peak and wall time
        phases[state["name"]] = {"peak_rss_mb": rss_mb("VmHWM"), "s": time.perf_counter() - state["t"]}
        reset_peak_rss()
        state.update(name=next_name, t=time.perf_counter())

    def wrap(mod, name, before, after):
        f = getattr(mod, name)

        def inner(*a, **k):
            mark(before)
            out = f(*a, **k)
            mark(after)
            return out
        setattr(mod, name, inner)

    wrap(onnx_export, "onnx_from_meta_module", "export", "after_export")
    wrap(parity, "run_onnx", "parity_onnxruntime", "verdict_checks")
    base = rss_mb("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    # release=True as export_bundle calls it: the torch weights are dropped before the parity session opens
    graph, result = bundle.export_vision_gate(src, dset, "reference", work, text_embeds=te, release=True)
    seconds = time.perf_counter() - t0
    mark("done")
    peak = max(p["peak_rss_mb"] for p in phases.values())
    return {"seconds": seconds, "weight_bytes": weight_bytes, "rss_before_mb": base, "peak_rss_mb": peak,
            "peak_multiple": peak * 2**20 / weight_bytes,
            "increment_multiple": (peak - base) * 2**20 / weight_bytes,
            "phases": phases, "parity": result.max_abs_err, "release": True,
            "encoder_layers_computed": graph["encoder_layers_computed"]}


def child_bundle(shape: dict, work: Path) -> dict:
    """Checkpoints -> ``export_bundle`` (gate calibrated so the clean image is neutral) -> derived graphs."""
    from safeclip.export.bundle import ExportOptions, export_bundle

    llava_dir, clip_dir, te = build_checkpoints(shape, work / "ckpt", IMAGE)
    t0 = time.perf_counter()
    rep = export_bundle(ExportOptions(model=str(llava_dir), clip=str(clip_dir), out=work / "bundle",
                                      text_embeds_override=te))
    out = {"bundle": str(rep.bundle), "bundle_export_s": time.perf_counter() - t0}
    gated = rep.bundle / "vision_gate.onnx"
    strip_gate(gated, work / "ungated" / "vision_gate.onnx")
    out["variants"] = {"ungated": str(work / "ungated" / "vision_gate.onnx")}

    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    m = ir.load(str(gated))
    _, stats = optimize_for_ort(m)
    (work / "ort_fusions").mkdir()
    ir.save(m, str(work / "ort_fusions" / "vision_gate.onnx"), external_data="vision_gate.onnx.data")
    out["variants"]["ort_fusions"] = str(work / "ort_fusions" / "vision_gate.onnx")
    out["ort_fusions_stats"] = {k: v for k, v in stats.items() if v}
    del m
    trim()
    from onnxruntime.transformers.optimizer import optimize_model
    opt = optimize_model(str(gated), model_type="clip", num_heads=shape["heads"], hidden_size=shape["hidden"],
                         opt_level=0, use_gpu=False)
    out["optimizer_clip_stats"] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(work / "optimizer_clip" / "vision_gate.onnx"), use_external_data_format=True)
    out["variants"]["optimizer_clip"] = str(work / "optimizer_clip" / "vision_gate.onnx")
    return out


def start_child(kind: str, args, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--work", str(work)]
    cmd += ["--quick"] if args.quick else []
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(kind: str, p: subprocess.Popen) -> dict:
    stdout, stderr = p.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if p.returncode != 0 or not lines:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark child '{kind}' failed (exit {p.returncode}):\n{tail}")
    return json.loads(lines[-1][len(CHILD_TAG):])


# ---------------------------------------------------------------------------------------------------------
# timing
def timed_rounds(variants: dict, rounds: int, warmup: int) -> dict:
    """Run every variant once per round (rotating order); keep the rounds after ``warmup``."""
    names = list(variants)
    runs = {n: [] for n in names}
    for r in range(rounds + warmup):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            value = variants[n]()
            if r >= warmup:
                runs[n].append(value)
    return runs


def clock(fn):
    def run():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


def per_call(fn, calls: int):
    """Median seconds per call of a very short function, over ``calls`` calls."""
    def run():
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    return run


def summary(values: list[float]) -> dict:
    q = np.percentile(values, [25, 50, 75])
    return {"median": float(q[1]), "iqr": float(q[2] - q[0]), "runs": [float(f"{v:.6g}") for v in values]}


def gemm_probes(n: int) -> dict:
    """fp32 n x n x n matrix products: numpy (its BLAS), PyTorch, ONNX Runtime MatMul with a constant B."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    g = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
                          [numpy_helper.from_array(b, "B")])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return {"gemm_numpy": clock(lambda: a @ b), "gemm_torch": clock(lambda: torch.mm(ta, tb)),
            "gemm_onnxruntime": clock(lambda: sess.run(None, {"A": a}))}


# ---------------------------------------------------------------------------------------------------------
def ort_session(path, **opts):
    """A CPU session configured like ``make_session`` plus ``opts`` (``threads``, ``spin``)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if opts.get("threads"):
        so.intra_op_num_threads = opts["threads"]
    if opts.get("spin") is False:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench(args) -> dict:
    import torch

    from safeclip.descriptors import load_descriptor_set
    from safeclip.export.bundle import vision_gate_from_sources
    from safeclip.export.checkpoint import load_sources
    from safeclip.export.onnx import onnx_from_module
    from safeclip.runtime.backends.ort import make_session
    from safeclip.runtime.gate import verdict_from_probs
    from safeclip.runtime.model import VisionGate
    from safeclip.runtime.pipeline import Pipeline

    shape = SHAPES["quick" if args.quick else "full"]
    res: dict = {"schema": 1, "mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                 "command": " ".join(["python", Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                 "loadavg_start": list(os.getloadavg()), "shapes": shape,
                 "settings": {"rounds": args.reps, "paired_rounds": 2 * args.reps, "warmup": args.warmup,
                              "torch_threads": torch.get_num_threads()}}
    res["machine"] = machine_facts(64 if args.quick else 512)
    work = Path(tempfile.mkdtemp(prefix="safeclip-bench-"))
    stages, t_stage = {}, [time.perf_counter()]
    res["stage_seconds"] = stages

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - t_stage[0], 2)
        t_stage[0] = now
    try:
        # full: one after the other (the export's wall time and memory alone); quick: side by side (< 1 min)
        cost = start_child("export-cost", args, work / "export-cost")
        try:
            if not args.quick:
                res["export"] = finish_child("export-cost", cost)
            built = finish_child("bundle", start_child("bundle", args, work))
            if args.quick:
                res["export"] = finish_child("export-cost", cost)
        finally:
            if cost.poll() is None:                                       # the bundle child failed first
                cost.kill()
                cost.wait()
        stage("children")
        res["fusions"] = {k: built[k] for k in ("ort_fusions_stats", "optimizer_clip_stats")}
        res["bundle_export_s"] = built["bundle_export_s"]

        pipe = Pipeline.load(built["bundle"])
        gated = pipe.vision.session                                       # make_session(): what the runtime serves
        src = load_sources(str(work / "ckpt" / "llava"), str(work / "ckpt" / "clip"), work / "src")
        src.llava.model.language_model = src.llava.lm_head = None         # only the vision half is needed here
        trim()
        te = torch.from_numpy(np.load(work / "ckpt" / "text_embeds.npy"))
        module = vision_gate_from_sources(src, load_descriptor_set("default"), "reference", te)
        tower = src.arch.vision_parts(src.llava).tower
        pv = pipe.pixel_values(str(IMAGE))                                # [1, 3, S, S]: the clean image
        feed, x = {"pixel_values": pv}, torch.from_numpy(pv)
        rule = (pipe.classes, pipe.safe_classes, pipe.threshold)         # the verdict the Pipeline computes

        # the gate head alone, with the graph's own weights, on a CLS vector [1, Dv]
        head = gate_head_module(module).eval()
        head_path = work / "head" / "gate_head.onnx"
        head_path.parent.mkdir()
        cls = torch.randn(1, shape["hidden"], generator=torch.Generator().manual_seed(2))
        onnx_from_module(head, (cls,), head_path, ["cls"], ["class_probs"])
        head_sess = ort_session(head_path)
        hw = {k: v.detach().numpy() for k, v in head.numpy_weights().items()}
        cls_np = cls.numpy()

        with torch.no_grad():                                             # the variants compute the same thing
            t_feats, t_probs = module(x)
        g_feats, g_probs = gated.sess.run(None, feed)
        checks = {"ort_vs_torch_features": float(np.abs(g_feats - t_feats.numpy()).max()),
                  "ort_vs_torch_probs": float(np.abs(g_probs - t_probs.numpy()).max()),
                  "head_onnx_vs_numpy": float(np.abs(head_sess.run(None, {"cls": cls_np})[0]
                                                     - head_numpy(cls_np, **hw)).max())}

        def torch_run(attn, module=module, tower=tower):
            def run():
                tower.set_attn_implementation(attn)                       # not timed
                with torch.no_grad():
                    t = time.perf_counter()
                    module(x)
                    return time.perf_counter() - t
            return run

        stage("setup")
        # stage 1: ONNX Runtime vs PyTorch, the GEMM peak, the gate head
        n = shape["gemm"]
        runs = timed_rounds({**gemm_probes(n), "torch_eager": torch_run("eager"), "torch_sdpa": torch_run("sdpa"),
                             "ort_gated": clock(lambda: gated.sess.run(None, feed)),
                             "head_onnxruntime": per_call(lambda: head_sess.run(None, {"cls": cls_np}), 200),
                             "head_numpy": per_call(lambda: head_numpy(cls_np, **hw), 200),
                             "verdict": per_call(lambda: verdict_from_probs(g_probs[0], *rule), 200)},
                            args.reps, args.warmup)
        stage("stage1")
        tower.set_attn_implementation("eager")
        del module, head, src, tower, t_feats, torch_run
        trim()

        # stage 2: ONNX Runtime settings and offline fusions, alternated with the runtime's own session
        bundle_graph = Path(built["bundle"]) / "vision_gate.onnx"
        sessions = {"ort_threads_2": ort_session(bundle_graph, threads=2),
                    "ort_no_spinning": ort_session(bundle_graph, spin=False),
                    "ort_ort_fusions": ort_session(built["variants"]["ort_fusions"]),
                    "ort_optimizer_clip": ort_session(built["variants"]["optimizer_clip"])}
        for name, s in sessions.items():
            checks[f"{name}_vs_gated_features"] = float(np.abs(s.run(None, feed)[0] - g_feats).max())
        stage2 = {"gemm_onnxruntime_t": gemm_probes(n)["gemm_onnxruntime"],
                  "ort_gated_t": clock(lambda: gated.sess.run(None, feed))}
        stage2.update({k: clock(lambda s=s: s.run(None, feed)) for k, s in sessions.items()})
        runs.update(timed_rounds(stage2, args.reps, args.warmup))
        del sessions, stage2
        trim()
        stage("stage2")

        # stage 3 (twice the rounds: small differences): with and without the gate head, graph and end to end,
        # and an A/A control: a second session of the same gated graph (where its weights land in memory alone
        # moves a session's speed by about 1%, which bounds what comparing two sessions can resolve)
        ungated = make_session(built["variants"]["ungated"])
        gated2 = make_session(bundle_graph)
        checks.update(ungated_vs_gated_features=float(np.abs(ungated.sess.run(None, feed)[0] - g_feats).max()),
                      ungated_outputs=ungated.output_names)
        plain = Pipeline(pipe.manifest, VisionGate(pipe.manifest, ungated), pipe.backend,   # the same runtime,
                         pipe.language_model)                                               # ungated graph
        twin = Pipeline(pipe.manifest, VisionGate(pipe.manifest, gated2), pipe.backend, pipe.language_model)
        first = {}

        def ttft(p, policy, key):                  # generate(max_new_tokens=1): preprocess + vision + prefill
            def run():
                t = time.perf_counter()
                a = p.generate(str(IMAGE), PROMPT, max_new_tokens=1, policy=policy)
                dt = time.perf_counter() - t
                first.setdefault(key, a)
                return dt
            return run
        # the ungated graph has no gate output, so its verdict fails closed ("unknown"); "annotate" keeps the
        # prompt unchanged, exactly as a clean image's verdict does under the default policy
        runs.update(timed_rounds({"ort_gated_p": clock(lambda: gated.sess.run(None, feed)),
                                  "ort_ungated_p": clock(lambda: ungated.sess.run(None, feed)),
                                  "ort_gated_p2": clock(lambda: gated2.sess.run(None, feed)),
                                  "ttft_gated": ttft(pipe, None, "gated"),
                                  "ttft_ungated": ttft(plain, "annotate", "ungated"),
                                  "ttft_gated2": ttft(twin, None, "gated2")}, 2 * args.reps, args.warmup))
        stage("stage3")
        g, u = first["gated"], first["ungated"]
        checks.update(clean_image_flagged=g.verdict.flagged, clean_image_category=g.verdict.category,
                      clean_image_score=g.verdict.score, prompt_tokens_gated=g.prompt_tokens,
                      prompt_tokens_ungated=u.prompt_tokens, first_token_equal=g.token_ids == u.token_ids,
                      pipeline_timings_gated=g.timings)
        res["checks"] = checks
        res["timings"] = {k: summary(v) for k, v in runs.items()}
        res["derived"] = derive(res, shape, pipe.manifest.graphs["vision_gate"]["encoder_layers_computed"])
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = list(os.getloadavg())
    return res


def paired(runs_a: list[float], runs_b: list[float]) -> dict:
    """Per-round relative difference a/b - 1 (one round: one load level): median and interquartile range."""
    d = [a / b - 1 for a, b in zip(runs_a, runs_b)]
    q = np.percentile(d, [25, 50, 75])
    return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2])}


def derive(res: dict, shape: dict, layers: int) -> dict:
    t = {k: v["median"] for k, v in res["timings"].items()}
    r = {k: v["runs"] for k, v in res["timings"].items()}
    flops, n = vision_flops(shape, layers), shape["gemm"]
    libs = ("gemm_numpy", "gemm_torch", "gemm_onnxruntime")
    gemm = {k: 2 * n ** 3 / t[k] / 1e9 for k in libs}
    lib = max(gemm, key=gemm.get)
    peak = gemm[lib]
    # per round: the vision graph's rate over the best library's GEMM rate in that same round
    per_round = [flops / v / max(2 * n ** 3 / r[k][i] for k in libs) for i, v in enumerate(r["ort_gated"])]
    res["machine"]["gemm_gflops_median"] = gemm
    res["machine"]["gemm_peak_gflops"] = {"median_of_best_library": peak, "library": lib,
                                          "best_single_run": max(2 * n ** 3 / min(r[k]) / 1e9 for k in libs)}
    tuning = {}
    for k in ("ort_threads_2", "ort_no_spinning", "ort_ort_fusions", "ort_optimizer_clip"):
        # stage 2 has only the ONNX Runtime GEMM probe: scale it by the stage-1 ratio of best library to ORT
        peak2 = 2 * n ** 3 / t["gemm_onnxruntime_t"] / 1e9 * peak / gemm["gemm_onnxruntime"]
        tuning[k] = {"median_s": t[k], "runtime_session_s": t["ort_gated_t"],
                     "vs_runtime_session": paired(r[k], r["ort_gated_t"]),
                     "fraction_of_peak": flops / t[k] / 1e9 / peak2,
                     "runtime_session_fraction_of_peak": flops / t["ort_gated_t"] / 1e9 / peak2}
    return {
        "gate": {"head_onnxruntime_ms": t["head_onnxruntime"] * 1e3, "head_numpy_ms": t["head_numpy"] * 1e3,
                 "vision_gate_s": t["ort_gated"], "head_over_vision": t["head_onnxruntime"] / t["ort_gated"],
                 "head_numpy_over_vision": t["head_numpy"] / t["ort_gated"],
                 "graph_overhead": paired(r["ort_gated_p"], r["ort_ungated_p"]),
                 "graph_overhead_of_medians": t["ort_gated_p"] / t["ort_ungated_p"] - 1,
                 "graph_overhead_of_minimums": min(r["ort_gated_p"]) / min(r["ort_ungated_p"]) - 1,
                 "graph_a_a_control": paired(r["ort_gated_p"], r["ort_gated_p2"])},
        "vision": {"flops": flops, "encoder_layers_computed": layers, "ort_s": t["ort_gated"],
                   "torch_eager_s": t["torch_eager"], "torch_sdpa_s": t["torch_sdpa"],
                   "ort_over_eager": t["torch_eager"] / t["ort_gated"],
                   "ort_over_sdpa": t["torch_sdpa"] / t["ort_gated"],
                   "ort_over_eager_paired": float(np.median([a / b for a, b in zip(r["torch_eager"], r["ort_gated"])])),
                   "ort_gflops": flops / t["ort_gated"] / 1e9, "fraction_of_peak": flops / t["ort_gated"] / 1e9 / peak,
                   "fraction_of_peak_paired": float(np.median(per_round)), "tuning": tuning},
        "e2e": {"ttft_gated_s": t["ttft_gated"], "ttft_ungated_s": t["ttft_ungated"],
                "overhead": paired(r["ttft_gated"], r["ttft_ungated"]),
                "overhead_of_medians": t["ttft_gated"] / t["ttft_ungated"] - 1,
                "overhead_of_minimums": min(r["ttft_gated"]) / min(r["ttft_ungated"]) - 1,
                "a_a_control": paired(r["ttft_gated"], r["ttft_gated2"]),
                "head_over_ttft": t["head_onnxruntime"] / t["ttft_gated"], "verdict_ms": t["verdict"] * 1e3,
                "gate_work_over_ttft": (t["head_onnxruntime"] + t["verdict"]) / t["ttft_gated"],
                "lm_layers": shape["lm_layers"]},
    }


# ---------------------------------------------------------------------------------------------------------
def pct(x: float, digits: int = 2) -> str:
    return f"{x * 100:+.{digits}f}%" if x < 0 else f"{x * 100:.{digits}f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--quick", action="store_true", help="tiny shapes (< 1 min): checks the benchmark works")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench.json"), help="JSON output path")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    shape = SHAPES["quick" if args.quick else "full"]
    if args.child:
        args.work.mkdir(parents=True, exist_ok=True)
        fn = {"export-cost": child_export_cost, "bundle": child_bundle}[args.child]
        print(CHILD_TAG + json.dumps(fn(shape, args.work)), flush=True)
        return 0
    args.reps = (2 if args.quick else 5) if args.reps is None else args.reps
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    try:
        res = bench(args)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(markdown_table(res, TARGETS, pct))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
