"""TensorRT runtime backend and safeclip-build, without a GPU.

The backend (safeclip.runtime.backends.trt) runs against stand-ins for ``tensorrt`` and cuda-python's runtime
(tests/_fake_trt.py) that enforce what the real ones require (shapes inside the active profile, 256-byte
aligned addresses, copies inside one allocation, stream order, no output overlapping another binding) and
execute the plan's ONNX graph with ONNX Runtime. The oracle is ONNX Runtime itself: OrtSession for the
vision graph and OrtDecoder's greedy generation for the decoder. The build's parity gate is run on fake
engines that differ from ONNX Runtime by a known amount. Real TensorRT/CUDA runs are marked ``trt``/``cuda``
and skip here.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from _fake_trt import FakeCudart, install_fakes, write_plan
from safeclip.runtime.backends.cuda import CudaRuntime
from safeclip.runtime.backends.ort import BackendError, make_session
from safeclip.runtime.backends.pick import Probe, choose_backend, open_decoder, open_vision
from safeclip.runtime.backends.trt import TrtDecoder, TrtVisionSession, decoder_shapes, plan_capacity
from safeclip.runtime.backends.trt_plan import plan_extend, plan_prefill
from safeclip.runtime.backends.trt_plan import PlanMismatchError, select_profile
from safeclip.runtime.backends.base import ContextError
from safeclip.runtime.graph_spec import KVSpec
from safeclip.runtime.backends.ort import OrtDecoder
from safeclip.runtime.manifest import load_manifest

ORIN = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "sm_count": "16",
        "memory_class_gib": "64"}
TRT_SKIP = "tensorrt not installed (cannot be installed here: no NVIDIA index)"


@pytest.fixture
def fakes(monkeypatch):
    """Fake tensorrt + cuda-python installed in sys.modules (as a JetPack 6 Orin would have them)."""
    return install_fakes(monkeypatch, "10.3.0.30")


def jetson_profiles(manifest):
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    return build_plan(TARGETS["jetson"], manifest.graphs, manifest.model)


# -- backend choice --------------------------------------------------------------------------------------

class FakeProbe(Probe):
    def __init__(self, device=ORIN, providers=("CUDAExecutionProvider", "CPUExecutionProvider")):
        self.device, self.providers = device, list(providers)

    def tensorrt_device(self):
        if isinstance(self.device, Exception):
            raise self.device
        return dict(self.device)

    def ort_providers(self):
        return self.providers


def manifest_dict(engines=True, target="jetson", **rec_over):
    plan = {"vision_gate": {}, "decoder": {}} if target != "cpu" else {}
    recs = {g: {"file": f"{g}.plan", **ORIN, **rec_over} for g in plan} if engines else {}
    files = {"vision_gate.onnx": {}, "decoder.onnx": {}, **{r["file"]: {} for r in recs.values()}}
    return {"target": target, "graphs": {"vision_gate": {}, "decoder": {}}, "files": files,
            "build": {"plan": plan, "engines": recs}}


def test_auto_prefers_tensorrt_then_cuda_then_cpu():
    assert choose_backend(manifest_dict(), probe=FakeProbe()).name == "tensorrt"
    c = choose_backend(manifest_dict(engines=False), probe=FakeProbe())
    assert c.name == "onnxruntime-cuda" and "safeclip-build --bundle DIR" in c.notes[0]
    c = choose_backend(manifest_dict(engines=False), probe=FakeProbe(providers=["CPUExecutionProvider"]))
    assert c.name == "onnxruntime-cpu" and len(c.notes) == 2 and "install onnxruntime-gpu" in c.notes[1]
    c = choose_backend(manifest_dict(target="cpu"), probe=FakeProbe())
    assert c.name == "onnxruntime-cuda" and "no TensorRT build plan" in c.notes[0]


def test_auto_skips_incompatible_or_missing_tensorrt_with_the_reason():
    c = choose_backend(manifest_dict(gpu_name="NVIDIA H100 80GB HBM3"), probe=FakeProbe())
    assert c.name == "onnxruntime-cuda"
    assert "GPU NVIDIA H100 80GB HBM3 (plan) vs Orin" in c.notes[0] and "safeclip-build --bundle" in c.notes[0]
    missing = BackendError("TensorRT is not installed: on Jetson use the JetPack's system package")
    c = choose_backend(manifest_dict(), probe=FakeProbe(device=missing))
    assert c.name == "onnxruntime-cuda" and "TensorRT is not installed" in c.notes[0]
    m = manifest_dict()
    del m["files"]["decoder.plan"]                                  # an engine the manifest does not hash
    assert "not hashed" in choose_backend(m, probe=FakeProbe()).notes[0]


def test_explicit_requests_that_cannot_be_honoured_raise():
    with pytest.raises(BackendError, match="tensorrt backend unavailable: no TensorRT engines for vision_gate, "
                                           "decoder; build them on this device: safeclip-build --bundle DIR"):
        choose_backend(manifest_dict(engines=False), "tensorrt", probe=FakeProbe())
    with pytest.raises(BackendError, match="10.16.0.72 \\(plan\\) vs 10.3.0.30.*safeclip-build"):
        choose_backend(manifest_dict(tensorrt_version="10.16.0.72"), "tensorrt", probe=FakeProbe())
    with pytest.raises(BackendError, match="onnxruntime-cuda backend unavailable.*install onnxruntime-gpu"):
        choose_backend(manifest_dict(), "cuda", probe=FakeProbe(providers=["CPUExecutionProvider"]))
    with pytest.raises(BackendError, match="unknown backend 'vulkan' \\(supported: auto, tensorrt"):
        choose_backend(manifest_dict(), "vulkan", probe=FakeProbe())
    with pytest.raises(BackendError, match="onnxruntime-tensorrt is not supported .*rebuild its engines whenever the "
                                           "KV length grows\\): use tensorrt, with engines from safeclip-build"):
        choose_backend(manifest_dict(), "onnxruntime-tensorrt",
                       probe=FakeProbe(providers=["TensorrtExecutionProvider", "CPUExecutionProvider"]))
    assert choose_backend(manifest_dict(), "onnxruntime", probe=FakeProbe()).name == "onnxruntime-cpu"
    assert choose_backend(manifest_dict(), "onnxruntime-gpu", probe=FakeProbe()).name == "onnxruntime-cuda"


def test_real_probe_on_this_machine_falls_back_to_onnxruntime(demo_bundle_traced, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)             # import tensorrt -> ImportError
    m = load_manifest(demo_bundle_traced)
    c = choose_backend(m)
    assert c.name in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert "no TensorRT build plan" in c.notes[0]                   # the demo bundle is a cpu-target export
    with pytest.raises(BackendError, match="tensorrt backend unavailable"):
        choose_backend(m, "tensorrt")


# -- decoder: shapes, profiles, capacity -------------------------------------------------------------------

KV = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")


def test_profile_choice_prefill_vs_decode():
    from safeclip.export.targets import TARGETS
    profiles = TARGETS["jetson"].decoder_profiles(64, 2, 2, 16, 2048)
    assert plan_capacity(profiles, KV, 64) == 2048
    for S in (2, 100, 512):                                         # a prompt's first chunk: the prefill profile
        assert select_profile(profiles, decoder_shapes(KV, 64, 0, S)) == 0
    assert plan_prefill(profiles, KV, 64) == 512                    # longer prompts go on in extensions
    with pytest.raises(Exception, match="no optimization profile covers"):
        select_profile(profiles, decoder_shapes(KV, 64, 0, 513))
    for P in (1, 639, 1024, 2047, 2048):                            # one token on a bucket: the decode profile
        assert select_profile(profiles, decoder_shapes(KV, 64, P, 1)) == 1
    for P, S in ((1, 2), (16, 64), (2048, 512)):                    # a follow-up turn: the extend profile
        assert select_profile(profiles, decoder_shapes(KV, 64, P, S)) == 2
    assert plan_capacity(profiles[:1], KV, 64) == 1                 # prefill profile alone: no decode past 0
    assert plan_capacity(profiles[1:2], KV, 64) == 2048             # decode profile alone: prompts token by token
    assert plan_prefill(profiles[1:2], KV, 64) == 1
    assert plan_extend(profiles, KV, 64, 2048, 512) == 512 and plan_extend(profiles[:2], KV, 64, 2048, 512) == 1
    assert plan_extend(profiles, KV, 64, 2048, 100) == 100          # the runtime's own limit


def test_plan_capacity_stops_at_the_first_gap():
    from safeclip.export.targets import TARGETS
    pre, dec, *_ = TARGETS["jetson"].decoder_profiles(64, 2, 2, 16, 2048)
    short = json.loads(json.dumps(dec))
    for n, spec in short.items():                                   # decode profile: past only up to 99
        if n.startswith("past_key_values"):
            spec["max"][2], spec["opt"][2] = 99, 50
        elif n == "attention_mask":
            spec["max"][1], spec["opt"][1] = 100, 51
    assert plan_capacity([pre, short], KV, 64) == 99                # a bucket may reach the capacity: past <= C
    with pytest.raises(Exception, match="no optimization profile covers"):
        select_profile([pre, short], decoder_shapes(KV, 64, 100, 1))


# -- running plans against the stand-ins ---------------------------------------------------------------

@pytest.fixture(scope="module")
def plans(tmp_path_factory, demo_bundle_traced):
    """Fake plans for the demo bundle's (fp32) graphs with the jetson target's profiles."""
    m = load_manifest(demo_bundle_traced)
    plan = jetson_profiles(m)
    d = tmp_path_factory.mktemp("plans")
    return {"manifest": m, "plan": plan,
            "vision": write_plan(demo_bundle_traced / "vision_gate.onnx", d / "vision_gate.plan", plan["vision_gate"]["profiles"]),
            "decoder": write_plan(demo_bundle_traced / "decoder.onnx", d / "decoder.plan", plan["decoder"]["profiles"])}


def test_vision_session_matches_onnxruntime(fakes, plans):
    trt, rt = fakes
    m = plans["manifest"]
    outs = {n: o["shape"] for n, o in m.graphs["vision_gate"]["outputs"].items()}
    s = TrtVisionSession(plans["vision"], output_symbols=outs)
    ref = make_session(m.path("vision_gate.onnx"))
    assert s.provider == "tensorrt" and s.input_names == ["pixel_values"]
    assert s.output_names == ref.output_names and s.output_shapes == {n: list(v) for n, v in outs.items()}
    rng = np.random.default_rng(3)
    for batch in (1, 3, 4):                                         # jetson profile: 1..4 views
        pv = rng.uniform(-1.8, 2.1, (batch, 3, 336, 336)).astype(np.float32)
        got, want = s.run({"pixel_values": pv}), ref.run({"pixel_values": pv})
        for k in want:
            assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
            assert np.allclose(got[k], want[k], atol=1e-6), \
                f"{k} [batch {batch}] differs from ONNX Runtime by {np.abs(got[k] - want[k]).max():.3g}"
    with pytest.raises(BackendError, match="no optimization profile covers pixel_values \\[5, 3, 336, 336\\]"):
        s.run({"pixel_values": np.zeros((5, 3, 336, 336), np.float32)})
    with pytest.raises(ValueError, match="missing inputs \\['pixel_values'\\]"):
        s.run({})
    s.close()
    assert rt.blocks == {}                                           # every buffer freed


def test_decoder_generates_as_ort_decoder_without_allocating_per_step(fakes, plans):
    trt, rt = fakes
    m = plans["manifest"]
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    table = np.load(m.path(m.data["embeddings"]["file"]))           # [V, D]
    ref = OrtDecoder(m.path("decoder.onnx"), kv, capacity=64)
    dec = TrtDecoder(plans["decoder"], kv, capacity=64)
    assert (dec.hidden_size, dec.vocab_size, dec.dtype) == (ref.hidden_size, ref.vocab_size, ref.dtype)
    # one arena: a key and a value buffer [1, kv_heads, capacity, head_dim] per layer
    assert dec.kv_bytes == 2 * kv.num_layers * kv.num_kv_heads * 64 * kv.head_dim * np.dtype(kv.dtype).itemsize
    mallocs, live = rt.mallocs, len(rt.blocks)
    rng = np.random.default_rng(0)
    for prompt_len in (5, 1, 17):
        prompt = table[rng.integers(0, table.shape[0], prompt_len)]
        a, b = ref.prefill(prompt), dec.prefill(prompt)
        assert np.allclose(a, b, atol=1e-5), f"prefill logits differ from OrtDecoder by {np.abs(a - b).max():.3g}"
        assert dec.length == prompt_len
        switches = trt.fake_stats["profile_switches"]
        for _ in range(8):                                          # greedy: same tokens, same logits
            tok = int(np.argmax(a))
            assert tok == int(np.argmax(b))
            a, b = ref.decode_one_token(table[tok]), dec.decode_one_token(table[tok])
            assert np.allclose(a, b, atol=1e-5), f"decode logits differ from OrtDecoder by {np.abs(a - b).max():.3g}"
        assert trt.fake_stats["profile_switches"] - switches == 1          # to decode once, then it stays
    assert rt.mallocs == mallocs and len(rt.blocks) == live           # nothing allocated per step
    assert trt.fake_stats["contexts"] == 1                                  # one context, profiles switched
    dec.reset(63)
    dec.decode_one_token(table[0])                                     # the last slot: past 63, total 64
    with pytest.raises(ContextError, match="64 cached \\+ 1 new tokens exceed the cache capacity 64"):
        dec.decode_one_token(table[0])
    with pytest.raises(ContextError, match="prompt of 65 tokens exceeds the cache capacity 64"):
        dec.prefill(np.zeros((65, dec.hidden_size), np.float32))
    dec.close()
    assert rt.blocks == {}


def test_decoder_capacity_follows_the_profiles_and_the_model(fakes, plans):
    m = plans["manifest"]
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    dec = TrtDecoder(plans["decoder"], kv, context_length=512)
    assert (dec.capacity, dec.plan_capacity) == (512, 2048)
    dec.close()
    dec = TrtDecoder(plans["decoder"], kv)
    assert dec.capacity == 2048
    dec.close()
    with pytest.raises(ContextError, match="capacity 4096 is outside the 1..2048 tokens the engine's profiles cover"):
        TrtDecoder(plans["decoder"], kv, capacity=4096)
    with pytest.raises(ContextError, match="exceeds the model's context length 100"):
        TrtDecoder(plans["decoder"], kv, capacity=200, context_length=100)


def test_plans_for_another_device_are_refused_before_loading(fakes, plans):
    trt, _ = fakes
    rec = {"file": "decoder.plan", **ORIN, "gpu_name": "NVIDIA H100 80GB HBM3"}
    kv = KVSpec.from_manifest(plans["manifest"].graphs["decoder"]["kv"])
    loaded = trt.fake_stats["deserialized"]
    with pytest.raises(PlanMismatchError, match="GPU NVIDIA H100 80GB HBM3 \\(plan\\) vs Orin \\(this device\\).*"
                                                "safeclip-build --bundle engines/x"):
        TrtDecoder(plans["decoder"], kv, record=rec, bundle="engines/x")
    rec = {"file": "vision_gate.plan", **ORIN, "tensorrt_version": "10.3.0.26"}
    with pytest.raises(PlanMismatchError, match="TensorRT 10.3.0.26 \\(plan\\) vs 10.3.0.30"):
        TrtVisionSession(plans["vision"], record=rec)                  # this device's facts come from the fakes
    assert trt.fake_stats["deserialized"] == loaded


def test_missing_tensorrt_or_cuda_python_names_the_install(monkeypatch, plans):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match="TensorRT is not installed: on Jetson use the JetPack"):
        TrtVisionSession(plans["vision"])
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError, match="pip install cuda-python"):
        CudaRuntime()


def test_cuda_errors_are_one_line_backend_errors():
    rt = CudaRuntime(FakeCudart(limit_bytes=1 << 20))
    with pytest.raises(BackendError, match="CUDA cudaMalloc failed: out of memory"):
        rt.malloc(2 << 20)
    host = rt.host_array(10, np.float16)
    assert host.shape == (10,) and host.dtype == np.float16
    rt.release()
    assert rt.rt.blocks == {}


# -- safeclip-build ---------------------------------------------------------------------------------------

# what a real engine differs by: fp16/TF32 kernels; small enough for the parity gate's tolerance
DRIFT = {"logits": 2e-3, "class_probs": 1e-3, "image_features": 5e-4}


def fake_builder(calls, perturb=DRIFT):
    """Stands in for runtime.backends.trt_build.engine_from_onnx: writes a fake plan whose outputs differ from
    ONNX Runtime by ``perturb`` {output: delta}, returns the same record fields."""
    import hashlib

    def build(onnx_path, plan_path, profiles, precision, workspace_bytes, timing_cache, progress, device):
        calls.append((onnx_path.name, precision, workspace_bytes))
        progress("Building engine (2 steps)")
        write_plan(onnx_path, plan_path, profiles, perturb=perturb)
        data = plan_path.read_bytes()
        return {"file": plan_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "precision": precision, "workspace_bytes": workspace_bytes, "profiles": profiles, **device}
    return build


@pytest.fixture
def jetson_bundle(tmp_path, demo_bundle_traced):
    """The demo bundle re-planned for jetson (fp32 graphs, jetson profiles), re-sealed."""
    from safeclip.runtime.manifest import write_manifest
    b = shutil.copytree(demo_bundle_traced, tmp_path / "b")
    m = load_manifest(b)
    data = dict(m.data)
    data["target"] = "jetson"
    data["build"] = {**data["build"], "target": "jetson", "plan": jetson_profiles(m), "engines": {}}
    write_manifest(b, data)
    return b


def test_build_records_engines_and_reseals(fakes, jetson_bundle):
    from safeclip.runtime.build import build_engines
    calls, msgs = [], []
    report = build_engines(jetson_bundle, build_engine=fake_builder(calls), progress=msgs.append)
    assert sorted(report.built) == ["decoder", "vision_gate"] and report.kept == []
    assert {c[1] for c in calls} == {"strongly_typed"} and {c[2] for c in calls} == {2 << 30}
    assert any("decoder: Building engine (2 steps)" in s for s in msgs)
    m = load_manifest(jetson_bundle, full_verify=True)                # re-sealed; plan files hashed
    eng = m.data["build"]["engines"]
    for g in ("vision_gate", "decoder"):
        rec = eng[g]
        assert rec["file"] == f"{g}.plan" and m.data["files"][rec["file"]]["size"] == rec["bytes"]
        assert {k: rec[k] for k in ORIN} == ORIN and rec["graph_precision"] == "float32"
        assert rec["onnx_sha256"] == m.data["files"][f"{g}.onnx"]["sha256"]
    for g, outs in (("vision_gate", ("class_probs", "image_features")), ("decoder", ("logits",))):
        par = eng[g]["parity"]                                          # the engines' drift, measured
        assert sorted(par) == sorted(outs), par
        for k in outs:
            assert par[k] == pytest.approx(DRIFT[k], rel=1e-3), f"{g} {k}: parity {par[k]} vs drift {DRIFT[k]}"
    assert eng["decoder"]["profile_names"] == ["prefill", "decode", "extend"]
    assert len(eng["decoder"]["profiles"]) == 3
    assert not list(jetson_bundle.glob(".*.building"))
    assert choose_backend(m, probe=FakeProbe()).name == "tensorrt"
    # the runtime loads what was built
    vs, dec = open_vision(m, "tensorrt"), open_decoder(m, "tensorrt", context=32)
    assert isinstance(vs, TrtVisionSession) and isinstance(dec, TrtDecoder)
    pv = np.zeros((1, 3, 336, 336), np.float32)
    assert np.allclose(vs.run({"pixel_values": pv})["class_probs"], DRIFT["class_probs"] +
                       make_session(m.path("vision_gate.onnx")).run({"pixel_values": pv})["class_probs"], atol=1e-6)
    assert dec.capacity == 32 and dec.prefill(np.zeros((3, dec.hidden_size), np.float32)).shape == (dec.vocab_size,)
    # a second run keeps what is up to date; --force rebuilds
    report = build_engines(jetson_bundle, build_engine=fake_builder(calls), progress=msgs.append)
    assert report.built == {} and sorted(report.kept) == ["decoder", "vision_gate"] and len(calls) == 2
    report = build_engines(jetson_bundle, build_engine=fake_builder(calls), force=True, parity=False)
    assert sorted(report.built) == ["decoder", "vision_gate"] and report.built["decoder"]["parity"] == {}


def test_build_skips_decoder_parity_when_the_reference_would_not_fit(fakes, jetson_bundle, monkeypatch):
    import safeclip.runtime.build as build
    monkeypatch.setattr(build, "available_bytes", lambda: 1 << 20)   # 1 MiB free: ORT CPU must not be loaded
    msgs = []
    report = build.build_engines(jetson_bundle, build_engine=fake_builder([]), progress=msgs.append)
    assert report.built["decoder"]["parity"]["skipped"].startswith("ONNX Runtime reference needs about")
    assert report.built["vision_gate"]["parity"]["class_probs"] == pytest.approx(DRIFT["class_probs"], rel=1e-3)
    assert any("decoder: parity check skipped" in s for s in msgs)


def test_open_helpers_with_onnxruntime_cpu(demo_bundle_traced):
    m = load_manifest(demo_bundle_traced)
    vs = open_vision(m, "onnxruntime-cpu")
    assert vs.provider == "CPUExecutionProvider" and "class_probs" in vs.output_names
    assert open_decoder(m, "onnxruntime-cpu").capacity == 2048            # the model's context
    assert open_decoder(m, "onnxruntime-cpu", context=100).capacity == 100
    assert open_decoder(m, "onnxruntime-cpu", context=10 ** 6).capacity == 2048
    with pytest.raises(BackendError, match="unknown backend 'vulkan'"):
        open_vision(m, "vulkan")


def test_build_rebuilds_a_stale_plan_and_fails_closed_on_parity(fakes, jetson_bundle):
    from safeclip.runtime.build import BuildError, build_engines
    calls = []
    build_engines(jetson_bundle, build_engine=fake_builder(calls), parity=False)
    (jetson_bundle / "decoder.plan").write_text("{}")                  # a half-moved or foreign plan
    report = build_engines(jetson_bundle, build_engine=fake_builder(calls), parity=False)
    assert list(report.built) == ["decoder"] and report.kept == ["vision_gate"]
    before = (jetson_bundle / "manifest.json").read_bytes()

    bad = [({"logits": 1.5}, r"decoder prefill logits: engine differs from ONNX Runtime by 1\.5 \(tolerance 0\.\d+\)"),
           ({"class_probs": 0.05}, r"vision_gate class_probs: engine differs from ONNX Runtime by 0\.05 "
                                   r"\(tolerance 0\.01\)"),
           ({"logits": float("nan")}, r"decoder prefill logits: engine differs from ONNX Runtime by nan")]
    for perturb, msg in bad:                                            # the real comparator fails the build
        with pytest.raises(BuildError, match=msg):
            build_engines(jetson_bundle, build_engine=fake_builder(calls, perturb), force=True)
        assert (jetson_bundle / "manifest.json").read_bytes() == before    # nothing recorded
        assert not list(jetson_bundle.glob(".*.building"))
    load_manifest(jetson_bundle, full_verify=True)                      # still a valid bundle


def test_build_cli_without_tensorrt_is_one_line(monkeypatch, capsys, jetson_bundle, demo_bundle_traced):
    from safeclip.runtime.build import main, maybe_build_engines
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["--bundle", str(jetson_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safeclip-build: TensorRT is not installed") and "\n" not in err
    assert main(["--bundle", str(demo_bundle_traced)]) == 1                  # a cpu-target bundle has no plan
    assert "target 'cpu' has no TensorRT build plan" in capsys.readouterr().err
    assert main(["--bundle", str(jetson_bundle / "nope")]) == 1
    assert "no such bundle folder" in capsys.readouterr().err
    out = maybe_build_engines(jetson_bundle)
    assert not out.built and f"safeclip-build --bundle {jetson_bundle}" in out.message


def test_build_module_imports_no_torch():
    import subprocess
    code = ("import sys, safeclip.runtime.build, safeclip.runtime.backends.trt; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'tensorrt') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- real TensorRT / CUDA -----------------------------------------------------------------------------------

@pytest.mark.cuda
def test_real_cuda_copies_round_trip():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)")
    try:
        rt = CudaRuntime()
        rt.device_facts()
    except BackendError as e:
        pytest.skip(f"no usable CUDA device: {e}")
    x = rt.host_array(1000, np.float16)
    x[:] = np.arange(1000)
    y = rt.host_array(1000, np.float16)
    s = rt.stream()
    a, b = rt.malloc(x.nbytes), rt.malloc(x.nbytes)
    rt.h2d(a, x, x.nbytes, s)
    rt.d2d(b, a + 256, x.nbytes - 256, s)                                 # an aligned offset, as the decoder does
    rt.d2h(y, b, x.nbytes - 256, s)
    rt.sync(s)
    assert np.array_equal(y[: 1000 - 128], x[128:])
    rt.destroy_stream(s)
    rt.release()


@pytest.mark.trt
@pytest.mark.cuda
def test_real_engines_match_onnxruntime(tmp_path, demo_bundle_traced):
    """On a GPU machine with TensorRT: build the demo engines for real and compare with ONNX Runtime."""
    pytest.importorskip("tensorrt", reason=TRT_SKIP)
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)")
    from safeclip.runtime.build import build_engines
    from safeclip.runtime.manifest import write_manifest
    b = shutil.copytree(demo_bundle_traced, tmp_path / "b")
    m = load_manifest(b)
    data = dict(m.data)
    data["build"] = {**data["build"], "plan": jetson_profiles(m), "engines": {}}
    write_manifest(b, data)
    report = build_engines(b)                                          # parity gate included
    assert sorted(report.built) == ["decoder", "vision_gate"]
    assert choose_backend(load_manifest(b)).name == "tensorrt"
