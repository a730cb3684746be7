"""Engine builder (safeclip.runtime.backends.trt_build).

Without TensorRT: profile validation, the install hint, plan cache keys, atomic writes, and the build
orchestration against the stand-in ``tensorrt`` module (tests/_fake_trt.py, shared with the runtime backend's
tests), whose names tests/test_trt_api_names.py checks against the tensorrt 10.3.0 and 11.4.0.106 bindings.
With TensorRT and a GPU (``-m trt``): a real two-profile build of a small graph.
"""
from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from _fake_trt import fake_tensorrt  # noqa: E402
from safeclip.runtime.backends import trt_build as build  # noqa: E402

TRT_SKIP = "tensorrt not installed (cannot be installed here: no NVIDIA index)"
PROFILES = [{"x": {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}},          # decode-like: batch 1
            {"x": {"min": [1, 4], "opt": [4, 4], "max": [8, 4]}}]          # prefill-like: up to 8
DEVICE = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "sm_count": "16",
          "memory_class_gib": "64"}


def small_onnx(path: Path, op: str = "Relu", batch="B") -> Path:
    # x: [B, 4] -> MatMul w [4, 3] -> op -> y: [B, 3]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node(op, ["h"], ["y"], name="act")]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                          [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture
def with_trt(monkeypatch):
    def install(version="10.3.0.30", **kw):
        trt = fake_tensorrt(None, version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt
    return install


# -- no TensorRT ----------------------------------------------------------------------------------------

def test_missing_tensorrt_raises_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)        # import tensorrt -> ImportError
    with pytest.raises(build.TensorRTUnavailable, match="TensorRT is not installed: on Jetson use the JetPack"):
        build.import_tensorrt()
    with pytest.raises(build.TensorRTUnavailable, match="NVIDIA's index"):
        build.engine_from_onnx(small_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", PROFILES, device=DEVICE)
    with pytest.raises(build.TensorRTUnavailable, match="TensorRT is not installed"):
        build.device_key()
    assert not (tmp_path / "m.plan").exists()


def test_validate_profiles_normalises_and_rejects():
    one = build.validate_profiles(PROFILES[0])
    assert one == [{"x": {"min": (1, 4), "opt": (1, 4), "max": (1, 4)}}]
    assert len(build.validate_profiles(PROFILES)) == 2
    assert build.validate_profiles([]) == []                 # a graph without dynamic inputs needs none
    bad = [
        ({"x": {"min": [1], "max": [2]}}, "exactly the keys min, opt, max"),
        ({"x": {"min": [2, 4], "opt": [1, 4], "max": [8, 4]}}, "min <= opt <= max"),
        ({"x": {"min": [1], "opt": [1, 4], "max": [1, 4]}}, "different ranks"),
        ({"x": {"min": [1, -1], "opt": [1, 4], "max": [1, 4]}}, "non-negative ints"),
        ({"x": {"min": "14", "opt": [1, 4], "max": [1, 4]}}, "non-negative ints"),
        ({"x": {"min": [1.0, 4], "opt": [1, 4], "max": [1, 4]}}, "non-negative ints"),
        ([PROFILES[0], {"y": PROFILES[0]["x"]}], r"profile 1 names inputs \['y'\]"),
    ]
    for profiles, msg in bad:
        with pytest.raises(build.ProfileError, match=msg):
            build.validate_profiles(profiles)


def test_plan_cache_key_changes_with_every_fact():
    base = dict(onnx_sha256="ab" * 32, device=DEVICE, precision="strongly_typed", profiles=PROFILES)
    key = build.plan_cache_key(**base)
    assert key == build.plan_cache_key(**base) and len(key) == 64
    variants = [dict(onnx_sha256="cd" * 32), dict(precision="fp16"), dict(profiles=PROFILES[:1]),
                dict(device={**DEVICE, "tensorrt_version": "10.3.0.26"}), dict(device={**DEVICE, "gpu_name": "Thor"}),
                dict(device={**DEVICE, "compute_capability": "11.0"}), dict(device={**DEVICE, "sm_count": "8"}),
                dict(device={**DEVICE, "memory_class_gib": "16"}), dict(workspace_bytes=1 << 30)]
    keys = {build.plan_cache_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    with pytest.raises(ValueError, match="lack \\['gpu_name'\\]"):
        build.plan_cache_key(**{**base, "device": {k: v for k, v in DEVICE.items() if k != "gpu_name"}})


def test_save_engine_is_atomic(tmp_path):
    path = build.save_engine(b"\x00plan", tmp_path / "sub" / "v.plan")
    assert path.read_bytes() == b"\x00plan" and [p.name for p in path.parent.iterdir()] == ["v.plan"]
    build.save_engine(bytearray(b"new"), path)               # any bytes-like object (TensorRT's IHostMemory)
    assert path.read_bytes() == b"new" and len(list(path.parent.iterdir())) == 1
    with pytest.raises(build.EngineBuildError, match="empty engine"):
        build.save_engine(b"", tmp_path / "e.plan")


# -- build orchestration against the stand-in ------------------------------------------------------------

def test_trt10_strongly_typed_build(with_trt, tmp_path):
    with_trt("10.3.0.30")
    onnx_path, plan_path, cache = small_onnx(tmp_path / "m.onnx"), tmp_path / "out" / "m.plan", tmp_path / "t.cache"
    msgs = []
    rec = build.engine_from_onnx(onnx_path, plan_path, PROFILES, workspace_bytes=1 << 28, timing_cache=cache,
                                 progress=msgs.append, device=DEVICE)
    b = sys.modules["tensorrt"].Builder.fake_last
    assert b.fake_network.fake_flags == 1 << 1                         # STRONGLY_TYPED requested at network creation
    assert b.fake_config.fake_flags == set() and b.fake_config.fake_pools == {"WORKSPACE": 1 << 28}
    assert b.fake_config.fake_profiles == [{"x": ((1, 4), (1, 4), (1, 4))}, {"x": ((1, 4), (4, 4), (8, 4))}]
    assert plan_path.read_bytes() == b"PLAN []" and msgs == ["Building engine (2 steps)"]
    assert rec["file"] == "m.plan" and rec["bytes"] == 7 and rec["precision"] == "strongly_typed"
    assert rec["profiles"][1] == {"x": {"min": [1, 4], "opt": [4, 4], "max": [8, 4]}}
    assert {k: rec[k] for k in DEVICE} == DEVICE
    assert cache.read_bytes() == b"cache:10.3.0.30+"
    build.engine_from_onnx(onnx_path, plan_path, PROFILES, timing_cache=cache, device=DEVICE)
    b = sys.modules["tensorrt"].Builder.fake_last
    assert b.fake_config.fake_loaded == b"cache:10.3.0.30+"   # reused, then extended
    assert cache.read_bytes() == b"cache:10.3.0.30++"


def test_trt10_fp16_flag_build(with_trt, tmp_path):
    with_trt("10.16.0.72")
    build.engine_from_onnx(small_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", PROFILES, precision="fp16",
                           device=DEVICE)
    b = sys.modules["tensorrt"].Builder.fake_last
    assert b.fake_network.fake_flags == 0 and b.fake_config.fake_flags == {"FP16"}
    assert (tmp_path / "m.plan").read_bytes() == b"PLAN ['FP16']"


def test_trt11_is_strongly_typed_only(with_trt, tmp_path):
    with_trt("11.4.0.106")
    onnx_path = small_onnx(tmp_path / "m.onnx")
    build.engine_from_onnx(onnx_path, tmp_path / "m.plan", PROFILES, device=DEVICE)
    b = sys.modules["tensorrt"].Builder.fake_last
    assert b.fake_network.fake_flags == 0 and b.fake_config.fake_flags == set()   # always strongly typed (flag ignored)
    with pytest.raises(build.EngineBuildError, match="no BuilderFlag.FP16 \\(removed in TensorRT 11\\)"):
        build.engine_from_onnx(onnx_path, tmp_path / "m2.plan", PROFILES, precision="fp16", device=DEVICE)
    assert not (tmp_path / "m2.plan").exists()
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        build.engine_from_onnx(onnx_path, tmp_path / "m2.plan", PROFILES, precision="int8", device=DEVICE)


def test_precision_and_network_typing_must_agree(with_trt, tmp_path):
    trt = with_trt("10.3.0.30")
    builder = trt.Builder(build.make_logger(trt))
    logger = build.make_logger(trt)
    weak, _ = build.network_from_onnx_path(builder, small_onnx(tmp_path / "m.onnx"), False, logger, trt)
    with pytest.raises(build.EngineBuildError, match="needs a network created with STRONGLY_TYPED"):
        build.engine_bytes_from_network(builder, weak, precision="strongly_typed", trt=trt)
    strong, _ = build.network_from_onnx_path(builder, tmp_path / "m.onnx", True, logger, trt)
    with pytest.raises(build.EngineBuildError, match="needs a weakly typed network"):
        build.engine_bytes_from_network(builder, strong, precision="fp16", trt=trt)


def test_parser_errors_are_listed(with_trt, tmp_path):
    with_trt()
    path = small_onnx(tmp_path / "bad.onnx", op="Multinomial")
    with pytest.raises(build.EngineBuildError) as e:
        build.engine_from_onnx(path, tmp_path / "bad.plan", PROFILES, device=DEVICE)
    assert str(e.value) == "TensorRT could not parse bad.onnx: act (Multinomial): unsupported operator"


def test_profiles_must_fit_the_network(with_trt, tmp_path):
    with_trt()
    path = small_onnx(tmp_path / "m.onnx")
    cases = [([], "dynamic inputs \\['x'\\]: give at least one optimization profile"),
             ({"ids": {"min": [1], "opt": [1], "max": [1]}}, "names \\['ids'\\], which are not network inputs"),
             ({"x": {"min": [1, 5], "opt": [1, 5], "max": [2, 5]}}, "does not fit its dims \\(-1, 4\\)"),
             ({"x": {"min": [1], "opt": [1], "max": [1]}}, "does not fit")]
    for prof, msg in cases:
        with pytest.raises(build.ProfileError, match=msg):
            build.engine_from_onnx(path, tmp_path / "m.plan", prof, device=DEVICE)
    static = small_onnx(tmp_path / "static.onnx", batch=2)
    rec = build.engine_from_onnx(static, tmp_path / "static.plan", [], device=DEVICE)
    assert rec["profiles"] == [] and sys.modules["tensorrt"].Builder.fake_last.fake_config.fake_profiles == []


def test_failed_build_reports_tensorrt_errors(with_trt, tmp_path):
    with_trt(build_fails=True)
    with pytest.raises(build.EngineBuildError, match="failed to build the engine: out of workspace for layer mm"):
        build.engine_from_onnx(small_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", PROFILES, device=DEVICE)
    assert not (tmp_path / "m.plan").exists()


def test_foreign_timing_cache_is_replaced(with_trt, tmp_path, capsys):
    with_trt("10.3.0.30")
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"cache:10.16.0.72+++")
    build.engine_from_onnx(small_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", PROFILES, timing_cache=cache,
                           device=DEVICE)
    assert "does not match this device" in capsys.readouterr().err
    assert cache.read_bytes() == b"cache:10.3.0.30+"


def test_device_key_through_cuda_python(with_trt, monkeypatch):
    with_trt("10.3.0.30")

    class Err(enum.IntEnum):
        cudaSuccess, cudaErrorInsufficientDriver = 0, 35

    state = {"count": (Err.cudaSuccess, 1)}
    runtime = types.SimpleNamespace(
        cudaGetDeviceCount=lambda: state["count"],
        cudaGetDeviceProperties=lambda i: (Err.cudaSuccess,
                                           types.SimpleNamespace(name=b"Orin\x00\x00", major=8, minor=7,
                                                                 multiProcessorCount=8,      # an Orin NX 16GB
                                                                 totalGlobalMem=15_600_000_000)),
        cudaGetErrorString=lambda e: (Err.cudaSuccess, b"CUDA driver version is insufficient for CUDA runtime version"))
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = runtime, bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    assert build.device_key() == {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7",
                                  "sm_count": "8", "memory_class_gib": "16"}
    with pytest.raises(build.TensorRTUnavailable, match="CUDA device 1 not present"):
        build.device_key(1)
    state["count"] = (Err.cudaErrorInsufficientDriver, None)    # cuda-bindings 12.9 on a machine without a driver
    with pytest.raises(build.TensorRTUnavailable, match="cudaGetDeviceCount failed: CUDA driver version"):
        build.device_key()


# -- real TensorRT -------------------------------------------------------------------------------------

@pytest.mark.trt
def test_real_two_profile_build(tmp_path):
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP)
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)")
    onnx_path = small_onnx(tmp_path / "m.onnx")
    precisions = ["strongly_typed"] + (["fp16"] if build.tensorrt_major(trt) < 11 else [])
    for precision in precisions:
        plan = tmp_path / f"m-{precision}.plan"
        rec = build.engine_from_onnx(onnx_path, plan, PROFILES, precision=precision, workspace_bytes=1 << 28,
                                     timing_cache=tmp_path / "t.cache")
        assert rec["tensorrt_version"] == trt.__version__ and plan.stat().st_size == rec["bytes"]
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        assert engine is not None and engine.num_optimization_profiles == 2
        assert [tuple(s) for s in engine.get_tensor_profile_shape("x", 1)] == [(1, 4), (4, 4), (8, 4)]
    assert (tmp_path / "t.cache").stat().st_size > 0


@pytest.mark.trt
@pytest.mark.cuda
def test_real_device_key():
    pytest.importorskip("tensorrt", reason=TRT_SKIP)
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)")
    key = build.device_key()
    major, minor = key["compute_capability"].split(".")
    assert int(major) >= 5 and minor.isdigit() and key["gpu_name"]


# -- the stand-in's tensor sizes (tests/_fake_trt_shapes.py) ---------------------------------------------

def test_standin_sizes_the_demo_decoder_attention(demo_decoder_parts):
    """Shape inference on the demo decoder (loaded without its weights) finds the attention scores
    [B, H, S, P+S] (the graph groups query heads per KV head: [B, KVH, H/KVH*S, P+S], the same volume), and the
    stand-in's context memory grows with the profile's max as the scores do."""
    from _fake_trt_shapes import LIMIT, activation_bytes, tensor_volumes
    from safeclip.runtime.graph_spec import decoder_spec

    m, kv, table = demo_decoder_parts
    path, hidden = m.path("decoder.onnx"), table.shape[1]
    heads = hidden // kv.head_dim
    B, S, P = 2, 7, 5
    spec = decoder_spec(hidden, None, kv)
    vol = tensor_volumes(path, spec.shapes(batch=B, seq=S, past=P))
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    scores = [n.output[0] for n in g.node if n.op_type == "Softmax"]
    assert len(scores) == kv.num_layers and all(vol[s] == B * heads * S * (P + S) for s in scores), \
        {s: vol[s] for s in scores}
    assert vol["logits"] == B * 1 * table.shape[0] and vol[kv.present_key.format(i=0)] == B * kv.num_kv_heads * S * kv.head_dim
    assert not {t.name for t in g.initializer} & set(vol) and max(vol.values()) < LIMIT

    def prof(seq):
        return spec.profile(*[{"batch": 1, "seq": seq, "past": 0}] * 3)

    small, large = activation_bytes(path, prof(16)), activation_bytes(path, prof(256))
    assert small >= heads * 16 * 16 * 4                     # one layer's fp32 scores are alive at the softmax
    assert large >= heads * 256 * 256 * 4 and large > 16 * small    # quadratic in S: the scores dominate
    with pytest.raises(ValueError, match="not network inputs"):
        tensor_volumes(path, {"nope": (1,)})
