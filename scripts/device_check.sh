#!/usr/bin/env bash
# Device check: export the demo bundle, run it with whatever this machine has, compare with ONNX Runtime CPU.
#
#   bash scripts/device_check.sh       # from any shell; results in $OUT if set, else test-artifacts/device-check/
#
# Rows: ONNX Runtime CPU on the fp32 (cpu target) bundle is the reference; then ONNX Runtime CPU on the fp16
# (jetson target) bundle, torch on CUDA (the demo LLaVA itself, fp32), onnxruntime-gpu's CUDA provider on
# both bundles, and TensorRT (safeclip-build + the tensorrt backend) on the jetson bundle. Whatever is
# missing (CUDA, onnxruntime-gpu, TensorRT, cuda-python, transformers) is skipped with the reason. Parity:
# max |difference| against the reference for image features, gate probabilities, prefill logits, the
# verdict, and how many of 16 greedy tokens agree; timings: median vision call, prefill, decode tokens/s.
# Then continuous batching on the CUDA provider (slot decoder, 3 sequences of different lengths vs each alone),
# and the TensorRT backend's own code (TrtDecoder, TrtSlotDecoder: buffers, streams, 2-D copies, pinned
# staging) on this GPU's memory with the stand-in engine of tests/_fake_trt.py executing the graph (TensorRT
# itself is not needed for that row). SAFECLIP_DEVICE_CHECK_FAKE_CUDA=1 rehearses that row without a GPU.
# Needs no network. Budget: well inside 10 minutes on a GPU machine (each stage has its own timeout).
# Set SAFECLIP_BUNDLES=DIR holding cpu/ and jetson/ bundles to skip the export (e.g. where transformers
# is missing). Never part of CI.
#
# Python: $PYTHON if set, else the active virtualenv, else the repository's .venv (README's first command
# makes it), else python3 if it has the runtime's packages; otherwise it makes .venv (seeing the system's
# packages, e.g. JetPack's TensorRT) and installs the runtime there, and if that fails says what to do.
# Its work folder (bundles, caches, logs) is removed on exit; the results and logs stay in $RESULTS.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/safeclip-device-check.XXXXXX")"
RESULTS="${OUT:-$ROOT/test-artifacts/device-check}"
trap 'cp "$WORK"/*.log "$RESULTS"/ 2>/dev/null; rm -rf "$WORK"' EXIT      # the logs stay with the results
mkdir -p "$RESULTS" "$WORK/tmp"
export TMPDIR="$WORK/tmp"                # whatever the children leave in temporary folders goes with $WORK
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export SAFECLIP_CACHE_DIR="$WORK/cache"
t_start=$(date +%s)
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*"; }

has_runtime_deps() { "$1" -c "import numpy, onnxruntime, tokenizers, PIL, jinja2" >/dev/null 2>&1; }
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
elif has_runtime_deps python3; then
    PY=python3
else
    say "no Python with the runtime's packages: making $ROOT/.venv (--system-site-packages) and installing the runtime"
    if python3 -m venv --system-site-packages "$ROOT/.venv" >"$WORK/venv.log" 2>&1 &&
        "$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT" >>"$WORK/venv.log" 2>&1; then
        PY="$ROOT/.venv/bin/python"
    else
        tail -3 "$WORK/venv.log"
        say "could not make an environment (log: $RESULTS/venv.log): run README's first command (it makes" \
            ".venv), or activate an environment that has numpy, onnxruntime, tokenizers, pillow and jinja2" \
            "(or set PYTHON=...), and rerun"
        exit 1
    fi
fi
has_runtime_deps "$PY" || { say "$PY lacks the runtime's packages (numpy, onnxruntime, tokenizers, pillow," \
    "jinja2): activate the environment you installed safeclip-edge in, or set PYTHON=..."; exit 1; }
say "python: $PY"

say "environment"
"$PY" - <<'EOF' 2>&1 | tee "$RESULTS/environment.txt"
import importlib, platform, subprocess, sys
print(f"python {platform.python_version()} on {platform.machine()}")
def ver(mod):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "present")
    except Exception as e:
        return f"missing ({type(e).__name__})"
for mod in ("numpy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers", "tensorrt"):
    print(f"{mod:12s} {ver(mod)}")
try:
    import torch
    print(f"torch CUDA   {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
                                                         if torch.cuda.is_available() else ""))
except Exception:
    pass
try:
    import onnxruntime as ort
    gpu = subprocess.run([sys.executable, "-m", "pip", "show", "onnxruntime-gpu"], capture_output=True, text=True)
    print(f"onnxruntime  providers {ort.get_available_providers()}; "
          f"onnxruntime-gpu package {'installed' if gpu.returncode == 0 else 'not installed'}")
except Exception:
    pass
for mod in ("cuda.bindings.runtime", "cuda.cudart"):
    print(f"{mod:22s} {ver(mod)}")
EOF

same_checkout='import os, sys, safeclip.runtime as r; sys.exit(os.path.realpath(r.__path__[0]) != sys.argv[1])'
if "$PY" -c "$same_checkout" "$(realpath "$ROOT/runtime")" 2>/dev/null; then
    say "safeclip is installed from this checkout"
elif say "installing the repository (no dependencies, no network)" &&
        "$PY" -m pip install --no-deps --no-build-isolation -q -e . >"$WORK/pip.log" 2>&1; then
    say "pip install -e . done"
else
    # The packages are mapped from top-level folders (safeclip.export = export/ ...): a symlink shim on
    # PYTHONPATH reproduces that mapping without pip.
    mkdir -p "$WORK/shim/safeclip"
    for pkg in export runtime descriptors; do ln -s "$ROOT/$pkg" "$WORK/shim/safeclip/$pkg"; done
    export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
    say "pip install failed (log: $RESULTS/pip.log); using a PYTHONPATH shim"
fi
"$PY" -c "import safeclip.runtime, safeclip.export" || { say "cannot import safeclip: giving up"; exit 1; }

BUNDLES="${SAFECLIP_BUNDLES:-$WORK/bundles}"
if [[ -z "${SAFECLIP_BUNDLES:-}" ]]; then
    for target in cpu jetson; do
        say "exporting the demo bundle: --target $target"
        if ! timeout 150 "$PY" -m safeclip.export.cli --target "$target" --out "$BUNDLES/$target" >"$WORK/export-$target.log" 2>&1; then
            tail -3 "$WORK/export-$target.log"
            say "export ($target) failed: skipped"
        fi
    done
fi
[[ -f "$BUNDLES/cpu/manifest.json" ]] || { say "no cpu bundle: nothing to compare against (the export needs the" \
    "[export] extra: pip install -e '.[export]'; or set SAFECLIP_BUNDLES to a folder with cpu/ and jetson/" \
    "bundles)"; exit 1; }

say "running the backends"
timeout 360 "$PY" - "$BUNDLES" "$RESULTS" "$WORK" <<'EOF'
import json, os, shutil, statistics, sys, time, traceback
from pathlib import Path

import numpy as np

bundles, results, work = (Path(a) for a in sys.argv[1:4])
from safeclip.runtime.backends.ort import make_session, available_providers
from safeclip.runtime.gate import verdict_from_probs
from safeclip.runtime.backends.ort import OrtDecoder
from safeclip.runtime.generate import embed_prompt
from safeclip.runtime.manifest import load_manifest
from safeclip.runtime.error_text import one_line

NEW_TOKENS, REPEATS = 16, 5
rows, skipped = [], []
rng = np.random.default_rng(2024)
cpu = load_manifest(bundles / "cpu")
size = cpu.graphs["vision_gate"]["inputs"]["pixel_values"]["shape"][-1]
pv = rng.uniform(-1.8, 2.1, (1, 3, size, size)).astype(np.float32)        # pixel_values [1, 3, S, S]
model = cpu.model
table32 = np.load(cpu.path(cpu.data["embeddings"]["file"]))              # [V, D] fp32
gate = cpu.gate


def median_ms(fn):
    fn()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def verdict(probs):
    v = verdict_from_probs(probs[0], gate["classes"], gate["safe_classes"], gate["threshold"])
    return (v.flagged, v.category)


def greedy(prefill, step, table, embeds):
    """prefill(embeds) -> logits [V]; step(embed [D]) -> logits. Returns (prefill logits, tokens, ms, tok/s)."""
    t = time.perf_counter()
    first = np.array(prefill(embeds), np.float32)
    pre_ms = 1e3 * (time.perf_counter() - t)
    tokens, logits = [int(np.argmax(first))], first
    t = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        logits = np.asarray(step(table[tokens[-1]]), np.float32)
        tokens.append(int(np.argmax(logits)))
    dt = time.perf_counter() - t
    return first, tokens, pre_ms, (NEW_TOKENS - 1) / dt if dt > 0 else 0.0


# -- the reference: ONNX Runtime CPU on the fp32 bundle ----------------------------------------------------
ref_vision = make_session(cpu.path("vision_gate.onnx"), "cpu")
ref_out = ref_vision.run({"pixel_values": pv})
ids = np.array([int(model.get("bos_token_id") or 1)] + [model["image_token_id"]] * model["image_seq_length"]
               + list(rng.integers(5, table32.shape[0], 24)), np.int64)
embeds32 = embed_prompt(table32, ids, model["image_token_id"], ref_out["image_features"][0])   # [S, D]
CAP = len(ids) + NEW_TOKENS


def record(name, bundle, vision_out, vision_ms, gen):
    row = {"backend": name, "bundle": bundle, "vision_ms": round(vision_ms, 2)}
    if vision_out is not None:
        row["d_features"] = float(np.abs(vision_out["image_features"].astype(np.float32) - ref_out["image_features"]).max())
        row["d_probs"] = float(np.abs(vision_out["class_probs"].astype(np.float32) - ref_out["class_probs"]).max())
        row["verdict_same"] = verdict(vision_out["class_probs"]) == verdict(ref_out["class_probs"])
    if gen is not None:
        first, tokens, pre_ms, tps = gen
        row.update(prefill_ms=round(pre_ms, 2), tokens_per_s=round(tps, 1),
                   d_logits=float(np.abs(first - REF[0]).max()),
                   tokens_same=sum(a == b for a, b in zip(tokens, REF[1])))
    rows.append(row)


arena_lines = []


def arena_check(name, dec, x):
    """The one KV arena on this backend: its cache after a prefill (kv_read) against the CPU reference's, and
    truncate + extend (one call through the extend profile on TensorRT) against the prefill's logits."""
    a = np.asarray(dec.prefill(x), np.float32).copy()
    d_kv = max(float(np.abs(k.astype(np.float32) - r).max()) for k, r in zip(dec.kv_read(len(x)), REF_KV))
    half = len(x) // 2
    dec.truncate(half)
    b = np.asarray(dec.extend(x[half:]), np.float32)
    arena_lines.append(f"{name}: max|Δkv| vs onnxruntime-cpu {d_kv:.2e}; truncate({half}) + extend({len(x) - half}) "
                       f"vs prefill max|Δlogits| {float(np.abs(a - b).max()):.2e}")


def ort_run(bundle_name, device):
    m = load_manifest(bundles / bundle_name)
    vis = make_session(m.path("vision_gate.onnx"), device)
    dec = OrtDecoder.from_manifest(m.root, m.graphs["decoder"], capacity=CAP, context_length=m.model["context_length"],
                                   device=device)
    table = np.load(m.path(m.data["embeddings"]["file"]))
    x = embeds32.astype(dec.dtype)
    out = vis.run({"pixel_values": pv}), median_ms(lambda: vis.run({"pixel_values": pv})), \
        greedy(dec.prefill, dec.decode_one_token, table, x)
    arena_check(f"onnxruntime-{device} ({bundle_name} bundle)", dec, x)
    return out


dec_ref = OrtDecoder.from_manifest(cpu.root, cpu.graphs["decoder"], capacity=CAP, context_length=model["context_length"])
dec_ref.prefill(embeds32)
REF_KV = dec_ref.kv_read(len(embeds32))                  # the CPU arena after the prompt: [1, KVH, S, Hd] each
REF = greedy(dec_ref.prefill, dec_ref.decode_one_token, table32, embeds32)
record("onnxruntime-cpu (reference)", "cpu fp32", ref_out, median_ms(lambda: ref_vision.run({"pixel_values": pv})), REF)
if (bundles / "jetson" / "manifest.json").is_file():
    record("onnxruntime-cpu", "jetson fp16", *ort_run("jetson", "cpu"))
else:
    skipped.append("jetson bundle: not exported")

# -- torch on CUDA: the demo LLaVA itself ----------------------------------------------------------------
try:
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device")
    from safeclip.descriptors import load_descriptor_set
    from safeclip.export.bundle import vision_gate_from_sources
    from safeclip.export.checkpoint import load_sources
    src = load_sources("demo", None, work / "demo_src")
    vg = vision_gate_from_sources(src, load_descriptor_set(gate["descriptors"]["name"]), gate["variant"]).cuda()
    llava = src.llava.cuda().eval()
    x_pv, table_t = torch.from_numpy(pv).cuda(), torch.from_numpy(table32).cuda()

    def vision():
        with torch.no_grad():
            f, p = vg(x_pv)
        torch.cuda.synchronize()
        return {"image_features": f.float().cpu().numpy(), "class_probs": p.float().cpu().numpy()}

    import inspect
    # transformers 5.x names the KV cache `cache` (`past_key_values` is deprecated there); 4.x: past_key_values
    kv_arg = "cache" if "cache" in inspect.signature(llava.forward).parameters else "past_key_values"
    cache = {}

    def t_prefill(e):
        with torch.no_grad():
            out = llava(inputs_embeds=torch.from_numpy(np.asarray(e, np.float32))[None].cuda(), use_cache=True)
        cache["past"] = getattr(out, kv_arg)
        return out.logits[0, -1].float().cpu().numpy()

    def t_step(e):
        with torch.no_grad():
            out = llava(inputs_embeds=torch.as_tensor(np.asarray(e, np.float32))[None, None].cuda(),
                        use_cache=True, **{kv_arg: cache["past"]})
        cache["past"] = getattr(out, kv_arg)
        return out.logits[0, -1].float().cpu().numpy()

    record(f"torch cuda ({torch.cuda.get_device_name(0)})", "demo model fp32", vision(), median_ms(vision),
           greedy(t_prefill, t_step, table32, embeds32))
except Exception as e:
    skipped.append(f"torch CUDA reference: {one_line(e)}")

# -- onnxruntime-gpu -------------------------------------------------------------------------------------
if "CUDAExecutionProvider" in available_providers():
    for b in ("cpu", "jetson"):
        try:
            record("onnxruntime-cuda", f"{b} {'fp32' if b == 'cpu' else 'fp16'}", *ort_run(b, "cuda"))
        except Exception as e:
            skipped.append(f"onnxruntime-cuda on {b}: {one_line(e)}")
else:
    skipped.append(f"onnxruntime-gpu: no CUDAExecutionProvider (providers: {available_providers()})")

# -- TensorRT ------------------------------------------------------------------------------------------
try:
    import tensorrt  # noqa: F401
    have_trt = True
except ImportError:
    have_trt = False
    print("TensorRT: not installed — skipped")
    skipped.append("TensorRT: not installed — skipped")
if have_trt and (bundles / "jetson" / "manifest.json").is_file():
    try:
        from safeclip.runtime.build import build_engines
        from safeclip.runtime.backends.trt import TrtDecoder, TrtVisionSession
        tb = work / "jetson-trt"
        shutil.copytree(bundles / "jetson", tb)
        t = time.perf_counter()
        rep = build_engines(tb, timing_cache=work / "timing.cache", progress=lambda s: print(f"  safeclip-build: {s}"))
        print(f"  engines built in {time.perf_counter() - t:.1f}s: {sorted(rep.built)}")
        m = load_manifest(tb)
        vis, dec = TrtVisionSession.from_manifest(m), TrtDecoder.from_manifest(m, capacity=CAP)
        table = np.load(m.path(m.data["embeddings"]["file"]))
        record(f"tensorrt {tensorrt.__version__}", "jetson fp16", vis.run({"pixel_values": pv}),
               median_ms(lambda: vis.run({"pixel_values": pv})),
               greedy(dec.prefill, dec.decode_one_token, table, embeds32.astype(dec.dtype)))
        arena_check(f"tensorrt (extend_max {dec.extend_max})", dec, embeds32.astype(dec.dtype))
    except Exception as e:
        traceback.print_exc(limit=3)
        skipped.append(f"tensorrt: {one_line(e)}")

# -- continuous batching on the GPU backends; the TensorRT backend's cuda-python paths with the stand-in --------
batch_lines = []
CAP2 = len(ids) + 64


def batch_check(name, slots, make_solo, table):
    """Three sequences of different lengths (the image prompt and two prefixes of it) decoded together against
    each decoded alone by a one-sequence decoder of the same backend: max |Δlogits| over prefill + 8 steps,
    greedy agreement, and the median step at B = 3 against B = 1."""
    xs = [embeds32, embeds32[:40], embeds32[:7]]
    xs = [x.astype(slots.dtype) for x in xs]
    solo = [make_solo() for _ in xs]
    outs = [np.asarray(slots.prefill(i, x), np.float32) for i, x in enumerate(xs)]
    refs = [np.asarray(d.prefill(x), np.float32) for d, x in zip(solo, xs)]
    diff = max(float(np.abs(o - r).max()) for o, r in zip(outs, refs))
    toks, agree = [int(np.argmax(r)) for r in refs], 0
    for _ in range(8):
        out = np.asarray(slots.decode(table[toks]), np.float32)
        refs = [np.asarray(d.decode_one_token(table[t]), np.float32) for d, t in zip(solo, toks)]
        diff = max(diff, max(float(np.abs(o - r).max()) for o, r in zip(out, refs)))
        agree += sum(int(np.argmax(o)) == int(np.argmax(r)) for o, r in zip(out, refs))
        toks = [int(np.argmax(r)) for r in refs]
    t3 = median_ms(lambda: slots.decode(table[toks]))
    slots.free(2), slots.free(1)
    t1 = median_ms(lambda: slots.decode(table[toks[:1]]))
    copies = getattr(slots, "decode_copies", 0)
    batch_lines.append(f"{name}: batched vs alone max|Δlogits| {diff:.2e}, greedy {agree}/24 agree; step B=1 "
                       f"{t1:.2f} ms, B=3 {t3:.2f} ms ({t3 / t1:.2f}x); {copies} KV row copies in "
                       f"{8 + 2 * (REPEATS + 1)} steps")


if "CUDAExecutionProvider" in available_providers():
    from safeclip.runtime.backends.slots import SlotDecoder
    for b in ("cpu", "jetson"):
        try:
            m = load_manifest(bundles / b)
            mk = lambda: OrtDecoder.from_manifest(m.root, m.graphs["decoder"], capacity=CAP2, device="cuda",
                                                  context_length=m.model["context_length"])
            one = mk()
            batch_check(f"onnxruntime-cuda slots ({b} bundle)", SlotDecoder.sharing(one, 3), mk,
                        np.load(m.path(m.data["embeddings"]["file"])))
        except Exception as e:
            traceback.print_exc(limit=3)
            skipped.append(f"onnxruntime-cuda batching on {b}: {one_line(e)}")

try:                             # TensorRT's backend code on real device memory, the stand-in engine executing
    from safeclip.runtime.backends.cuda import CudaRuntime, import_cudart
    sys.path.insert(0, str(Path.cwd() / "tests"))
    from _fake_trt import FakeCudart, RealCudaBacking, fake_tensorrt, write_plan
    # SAFECLIP_DEVICE_CHECK_FAKE_CUDA=1: this section on the CUDA stand-in (a rehearsal of the script without a GPU)
    rehearsal = os.environ.get("SAFECLIP_DEVICE_CHECK_FAKE_CUDA") == "1"
    cuda_rt = FakeCudart() if rehearsal else import_cudart()
    copies = "the CUDA stand-in (rehearsal, no GPU)" if rehearsal else "real cuda-python copies"
    if int(CudaRuntime(cuda_rt).call("cudaGetDeviceCount")) < 1:
        raise RuntimeError("no CUDA device")
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    from safeclip.runtime.backends.trt import TrtDecoder, TrtSlotDecoder
    b = "jetson" if (bundles / "jetson" / "manifest.json").is_file() else "cpu"
    m = load_manifest(bundles / b)
    plan = write_plan(m.path("decoder.onnx"), work / "standin-decoder.plan",
                      build_plan(TARGETS["jetson"], m.graphs, m.model)["decoder"]["profiles"])
    fake = fake_tensorrt(RealCudaBacking(cuda_rt))
    mk = lambda: TrtDecoder(plan, m.decoder.kv, capacity=CAP2, trt=fake, cuda=CudaRuntime(cuda_rt))
    dec = mk()
    table = np.load(m.path(m.data["embeddings"]["file"]))
    record(f"tensorrt backend, stand-in engine (ONNX Runtime CPU executes), {copies}",
           f"{b} {'fp16' if b == 'jetson' else 'fp32'}", None, 0.0,
           greedy(dec.prefill, dec.decode_one_token, table, embeds32.astype(dec.dtype)))
    arena_check(f"tensorrt backend + stand-in engine, {copies}", dec, embeds32.astype(dec.dtype))
    batch_check(f"tensorrt backend slots + stand-in engine, {copies}", TrtSlotDecoder(dec, 3), mk,
                table)
except Exception as e:
    traceback.print_exc(limit=3)
    skipped.append(f"tensorrt backend on real CUDA with the stand-in engine: {one_line(e)}")

# -- report ------------------------------------------------------------------------------------------
cols = [("backend", "backend"), ("bundle", "bundle"), ("vision_ms", "vision ms"), ("d_features", "max|Δfeat|"),
        ("d_probs", "max|Δprob|"), ("verdict_same", "verdict"), ("prefill_ms", "prefill ms"),
        ("tokens_per_s", "tok/s"), ("d_logits", "max|Δlogits|"), ("tokens_same", f"tokens =/{NEW_TOKENS}")]
fmt = lambda v: "" if v is None else (f"{v:.2e}" if isinstance(v, float) and abs(v) < 0.1 else
                                      ("same" if v is True else "DIFFERENT" if v is False else str(v)))
lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
text = "\n".join(lines) + "\n\nKV arena:\n" + "\n".join(f"- {a}" for a in arena_lines or ["no GPU backend ran"]) + \
    "\n\nbatching:\n" + "\n".join(f"- {a}" for a in batch_lines or ["no GPU backend ran"]) + \
    "\n\nskipped:\n" + "\n".join(f"- {s}" for s in skipped or ["nothing"]) + "\n"
print("\n" + text)
(results / "device_check.md").write_text(text)
(results / "device_check.json").write_text(json.dumps({"rows": rows, "arena": arena_lines, "batching": batch_lines,
                                                     "skipped": skipped}, indent=2))
EOF
rc=$?
# The tests marked cuda (CUDA provider vs CPU arena, batched slots on the device, ...) on this GPU: the CPU runs
# pass them under copy-at-bind semantics (tests/_ort_binding.py); here the real provider decides.
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    say "pytest -m cuda (real CUDA provider)"
    timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_kv_arena.py tests/test_scheduler_gpu.py \
        tests/test_generate.py 2>&1 | tail -15 | tee "$RESULTS/pytest_cuda.txt"
fi
say "done (exit $rc); results in $RESULTS"
exit $rc
